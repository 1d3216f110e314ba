//! The Realtime link: the single owner of the Realtime WebSocket socket (token
//! `reactor::LINK`) on the loop thread, from DNS to close, with reconnection.
//!
//! It carries TEXT frames only and knows nothing of event types: the conversation core
//! parses them. Nothing here blocks the loop: DNS runs on a short-lived `walkie-dns` helper
//! thread that sends its answer over a channel and wakes the loop; the TCP connect, the TLS
//! handshake (inside [`TlsStream`]) and the WebSocket upgrade (a resumable tungstenite
//! `MidHandshake`) all advance on readiness; frames are written into bounded buffers and
//! flushed on WRITABLE. The connection is a state enum whose variants carry their data
//! (invalid states cannot be represented), and the socket's interest is derived from that state
//! after every read, write and flush (rustls' `tlsclient-mio` is the model).
//!
//! Policy, documented once here:
//! - Transient trouble (network errors, close frames, HTTP errors other than 401/403 at the
//!   upgrade, untrusted certificates, a silent socket) → [`LinkEvent::Closed`] and a
//!   reconnect after exponential backoff with ±25 % jitter. `Closed` is emitted after every
//!   failed attempt, not only when an open link drops.
//! - The backoff resets after a connection has stayed open for 30 s, not on the first
//!   frame: a server that accepts, sends `session.created` and closes at once must not make
//!   walkie hammer it at the minimum delay.
//! - Fatal trouble (bad URL, `ws://` to a non-loopback host, TLS configuration, HTTP
//!   401/403 at the upgrade, or [`Link::fail`]) → [`LinkEvent::Failed`], no retry until
//!   [`Link::reconnect_now`].
//! - Life: walkie pings every `ping_interval`; any byte received counts as life; nothing for
//!   two intervals → the socket is dead → `Closed` and reconnect.
//! - The API key goes only into the `Authorization` header; it is never logged and is
//!   scrubbed from every reason string as a second line of defence.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Waker};
use rustls::ClientConfig;
use tungstenite::client::IntoClientRequest;
use tungstenite::error::ProtocolError;
use tungstenite::handshake::client::{ClientHandshake, Request, Response};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::http::header::{AUTHORIZATION, TRANSFER_ENCODING};
use tungstenite::http::{HeaderValue, Uri};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocket, WebSocketConfig};
use tungstenite::{Bytes, Error as WsError, Message};

use super::events::FATAL_ERROR_CODES;
use super::tls::{self, TlsStream};
use crate::reactor::LINK;
use crate::tasks::redact::{self, Keep};

/// Each connection phase (DNS, TCP per address, TLS + upgrade) gets this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the server to end TCP after its close frame before dropping it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection open this long proves the endpoint healthy: the backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Largest incoming message; Realtime events are far smaller, this only stops abuse.
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// What the link needs to know; built by the daemon from `[realtime]`.
#[derive(Clone)]
pub struct LinkSettings {
    /// `ws://host:port/path?query` (loopback hosts only) or `wss://…`, model query included.
    pub url: String,
    /// Sent as `Authorization: Bearer …` when set; never logged, never in an error.
    pub api_key: Option<String>,
    /// Extra PEM trust anchors on top of the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Own pings this often; a socket silent for two intervals is dead. Zero turns both
    /// off (only for tests and peers that cannot take pings).
    pub ping_interval: Duration,
    /// First reconnect delay (500 ms by default).
    pub backoff_min: Duration,
    /// Largest reconnect delay (30 s by default).
    pub backoff_max: Duration,
    /// Bound on queued outgoing bytes; beyond it `send_text` returns `Backpressure`.
    /// Must exceed the largest single message.
    pub max_write_buffer: usize,
}

impl fmt::Debug for LinkSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSettings")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("ca_file", &self.ca_file)
            .field("ping_interval", &self.ping_interval)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("max_write_buffer", &self.max_write_buffer)
            .finish()
    }
}

/// What happened on the link, in order; drained with [`Link::poll_event`].
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// The WebSocket is upgraded: a new, empty server session. Send nothing before this.
    Open,
    /// One text frame from the server.
    Text(String),
    /// The connection (or an attempt) ended; the link reconnects by itself after
    /// `reconnect_in`.
    Closed {
        reason: String,
        reconnect_in: Duration,
    },
    /// Fatal: the link stays down until [`Link::reconnect_now`].
    Failed { reason: String },
}

/// The link's state as `walkie ctl status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStatus {
    Disabled,
    Connecting,
    Connected,
    Backoff { until: Instant },
    Failed,
}

impl LinkStatus {
    /// The word `walkie ctl status` and `systemctl status` show.
    pub fn as_str(&self) -> &'static str {
        match self {
            LinkStatus::Disabled => "disabled",
            LinkStatus::Connecting => "connecting",
            LinkStatus::Connected => "connected",
            LinkStatus::Backoff { .. } => "backoff",
            LinkStatus::Failed => "failed",
        }
    }
}

/// Why [`Link::send_text`] did not queue a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No open WebSocket (connecting, backing off, failed or dropped during this call). The
    /// caller drops the message: a new connection is a new session, restored after `Open`.
    #[error("the realtime link is not open")]
    NotOpen,
    /// The peer is not taking data and the bounded send buffer is full. The caller drops the
    /// message (audio) or tries again later; the dead-socket check ends a stuck connection.
    #[error("the realtime link's send buffer is full")]
    Backpressure,
}

/// The parsed `url`.
#[derive(Debug, Clone)]
struct Endpoint {
    uri: Uri,
    secure: bool,
    /// Without IPv6 brackets.
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, String> {
        // The URL itself is never echoed: a custom endpoint might carry a token in it.
        let uri: Uri = url
            .parse()
            .map_err(|_| "the realtime URL is not a valid URL".to_owned())?;
        let secure = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => {
                return Err(
                    "the realtime URL must start with wss:// (or ws:// for a local server)".into(),
                );
            }
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or("the realtime URL has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        if !secure && !is_loopback_host(&host) {
            return Err(format!(
                "ws:// (unencrypted) is only allowed to a loopback host, not {host}: use wss://"
            ));
        }
        Ok(Endpoint {
            uri,
            secure,
            host,
            port,
        })
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

/// The byte stream under tungstenite: plain TCP or TLS, plus what the owner needs to know
/// for its interest and its dead-socket check.
struct Wire {
    transport: Transport,
    /// Bytes handed up so far; any change counts as a sign of life.
    received: u64,
    /// The last write or flush hit a full socket: WRITABLE is wanted.
    write_blocked: bool,
    /// Until the server's answer to the upgrade is through.
    gate: Option<UpgradeGate>,
}

/// Longest response head to the upgrade request held back (tungstenite refuses 64 KiB).
const UPGRADE_HEAD_MAX: usize = 16 * 1024;
/// Longest body of a refused upgrade read: the error JSON is a few hundred bytes. With the
/// last byte of the head it fits the 4 KiB tungstenite reads at a time, so all of it reaches
/// the refusal it hands back.
const UPGRADE_BODY_MAX: usize = 4000;

/// Holds back the server's answer to the upgrade request until it can be judged. A refusal
/// (any status but 101) says why in its body (`insufficient_quota`, `invalid_api_key`, …),
/// but tungstenite stops reading at the end of the head and hands back only the bytes that
/// came with it: a body sent a moment later would be lost. So the head, and for a refusal
/// its body (bounded, see [`UPGRADE_BODY_MAX`]), are collected here, then released so that
/// the last byte of the head and the whole body arrive in one read. A 101 passes at once.
#[derive(Debug, Default)]
struct UpgradeGate {
    buf: Vec<u8>,
    /// Bytes of `buf` handed to tungstenite.
    released: usize,
    /// The head, once complete.
    head: Option<ResponseHead>,
    /// The server closed (or broke) the connection: what arrived is all there is.
    ended: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct ResponseHead {
    len: usize,
    status: u16,
    framing: BodyFraming,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BodyFraming {
    Length(usize),
    Chunked,
    UntilClose,
}

impl UpgradeGate {
    fn take(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.head.is_none() {
            self.head = parse_response_head(&self.buf);
        }
    }

    /// Everything needed has arrived: a 101 head, or a refusal's head and body.
    fn ready(&self) -> bool {
        let Some(head) = &self.head else {
            // An endless head is tungstenite's to refuse.
            return self.ended || self.buf.len() >= UPGRADE_HEAD_MAX;
        };
        if head.status == 101 || self.ended {
            return true;
        }
        let body = &self.buf[head.len..];
        body.len() >= UPGRADE_BODY_MAX
            || match head.framing {
                BodyFraming::Length(length) => body.len() >= length,
                BodyFraming::Chunked => decode_chunked(body).1,
                BodyFraming::UntilClose => false,
            }
    }

    /// Copies what may go to tungstenite now into `out`; None while holding back.
    fn release(&mut self, out: &mut [u8]) -> Option<usize> {
        if self.released == self.buf.len() || !self.ready() {
            return None;
        }
        let mut end = self.buf.len();
        if let Some(head) = &self.head
            && head.status != 101
        {
            end = end.min(head.len + UPGRADE_BODY_MAX);
            // Everything but the head's last byte first: tungstenite parses the head after
            // the read that completes it and keeps only that read's rest as the body.
            if self.released < head.len - 1 {
                end = head.len - 1;
            }
        }
        let n = out.len().min(end.saturating_sub(self.released));
        if n == 0 {
            return None;
        }
        out[..n].copy_from_slice(&self.buf[self.released..self.released + n]);
        self.released += n;
        Some(n)
    }

    /// Everything was handed over and the answer was a 101: the gate can go.
    fn open(&self) -> bool {
        self.released == self.buf.len() && self.head.as_ref().is_some_and(|h| h.status == 101)
    }

    /// A refusal collected so far (for a timeout while its body is still coming).
    fn refusal(&self) -> Option<(u16, Vec<u8>)> {
        let head = self.head.as_ref().filter(|h| h.status != 101)?;
        let body = &self.buf[head.len..];
        let body = &body[..body.len().min(UPGRADE_BODY_MAX)];
        Some((
            head.status,
            decode_body(body, head.framing == BodyFraming::Chunked),
        ))
    }
}

/// The status and body framing of a complete HTTP response head at the start of `buf`.
fn parse_response_head(buf: &[u8]) -> Option<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return None,
        // Not HTTP, or too many headers: tungstenite will say so.
        Err(_) => {
            return Some(ResponseHead {
                len: buf.len(),
                status: 0,
                framing: BodyFraming::Length(0),
            });
        }
    };
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let framing = if header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        BodyFraming::Chunked
    } else if let Some(length) = header("content-length").and_then(|v| v.parse().ok()) {
        BodyFraming::Length(length)
    } else {
        BodyFraming::UntilClose
    };
    Some(ResponseHead {
        len,
        status,
        framing,
    })
}

/// A chunked body's data so far, and whether its last chunk was seen.
fn decode_chunked(mut body: &[u8]) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    loop {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else {
            return (data, false);
        };
        let size_text = std::str::from_utf8(&body[..line_end]).unwrap_or("");
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return (data, false);
        };
        if size == 0 {
            return (data, true);
        }
        let start = line_end + 2;
        let available = body.len().saturating_sub(start).min(size);
        data.extend_from_slice(&body[start..start + available]);
        if available < size || body.len() < start + size + 2 {
            return (data, false);
        }
        body = &body[start + size + 2..];
    }
}

fn decode_body(body: &[u8], chunked: bool) -> Vec<u8> {
    if chunked {
        decode_chunked(body).0
    } else {
        body.to_vec()
    }
}

impl Wire {
    fn new(transport: Transport) -> Wire {
        Wire {
            transport,
            received: 0,
            write_blocked: false,
            gate: None,
        }
    }

    /// A wire for the upgrade: the server's answer goes through an [`UpgradeGate`].
    fn for_upgrade(transport: Transport) -> Wire {
        Wire {
            gate: Some(UpgradeGate::default()),
            ..Wire::new(transport)
        }
    }

    fn read_transport(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match &mut self.transport {
            Transport::Plain(sock) => sock.read(buf)?,
            Transport::Tls(tls) => tls.read(buf)?,
        };
        self.received += n as u64;
        Ok(n)
    }

    fn socket(&mut self) -> &mut TcpStream {
        match &mut self.transport {
            Transport::Plain(sock) => sock,
            Transport::Tls(tls) => tls.get_mut(),
        }
    }

    fn needs_writable(&self) -> bool {
        self.write_blocked
            || match &self.transport {
                Transport::Plain(_) => false,
                Transport::Tls(tls) => tls.wants_write(),
            }
    }

    /// Pushes queued TLS records; a full socket is fine (they go on WRITABLE).
    fn push_pending(&mut self) -> io::Result<()> {
        match &mut self.transport {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(tls) => match tls.push_tls() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                other => other,
            },
        }
    }

    fn close_notify(&mut self) {
        if let Transport::Tls(tls) = &mut self.transport {
            tls.send_close_notify();
        }
    }

    fn note_write<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        match &result {
            Ok(_) => self.write_blocked = false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.write_blocked = true,
            Err(_) => {}
        }
        result
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(gate) = self.gate.as_mut() else {
            return self.read_transport(buf);
        };
        loop {
            if let Some(n) = gate.release(buf) {
                if gate.open() {
                    self.gate = None;
                }
                return Ok(n);
            }
            if gate.ended {
                return Ok(0);
            }
            let mut chunk = [0u8; 4096];
            let read = match &mut self.transport {
                Transport::Plain(sock) => sock.read(&mut chunk),
                Transport::Tls(tls) => tls.read(&mut chunk),
            };
            match read {
                Ok(0) => gate.ended = true,
                Ok(n) => {
                    self.received += n as u64;
                    gate.take(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A refusal's sender may drop the connection without a TLS goodbye: what
                // came is the answer.
                Err(e) if e.kind() != io::ErrorKind::WouldBlock && gate.head.is_some() => {
                    gate.ended = true
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let result = match &mut self.transport {
            Transport::Plain(sock) => sock.write(buf),
            Transport::Tls(tls) => tls.write(buf),
        };
        self.note_write(result)
    }

    fn flush(&mut self) -> io::Result<()> {
        let result = match &mut self.transport {
            Transport::Plain(sock) => sock.flush(),
            Transport::Tls(tls) => tls.flush(),
        };
        self.note_write(result)
    }
}

type DnsAnswer = io::Result<Vec<SocketAddr>>;

/// An upgraded connection.
struct OpenLink {
    ws: WebSocket<Wire>,
    opened_at: Instant,
    last_rx: Instant,
    /// `Wire::received` when `last_rx` was taken.
    rx_seen: u64,
    ping_due: Instant,
    /// A `ws.flush()` returned WouldBlock: frames wait in the buffers.
    flush_pending: bool,
}

/// What servicing an open connection led to.
enum Outcome {
    Fine,
    /// The server sent a close frame (the reason is for `Closed`).
    PeerClosed(String),
    /// The connection is unusable (the reason is for `Closed`).
    Lost(String),
}

impl OpenLink {
    /// Sends what is queued. A flush that would block has queued everything: never resend.
    fn do_write(&mut self) -> Outcome {
        loop {
            match self.ws.flush() {
                Ok(()) => {
                    self.flush_pending = false;
                    return Outcome::Fine;
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.flush_pending = true;
                    return Outcome::Fine;
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Outcome::Lost(describe_ws_error(&e)),
            }
        }
    }

    /// Reads every frame available: mio is edge-triggered and tungstenite hands out one
    /// message per call while rustls and tungstenite may both hold buffered bytes.
    fn do_read(&mut self, now: Instant, events: &mut VecDeque<LinkEvent>) -> Outcome {
        let outcome = loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    events.push_back(LinkEvent::Text(text.as_str().to_owned()))
                }
                Ok(Message::Binary(data)) => {
                    debug!("ignoring a {}-byte binary frame", data.len());
                }
                Ok(Message::Close(frame)) => {
                    break Outcome::PeerClosed(describe_close(frame.as_ref()));
                }
                // Pings are answered by tungstenite itself (queued, flushed on the next
                // read/flush); pongs only prove life, which `received` already counts.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    break Outcome::Fine;
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Outcome::Lost(describe_ws_error(&e)),
            }
        };
        let received = self.ws.get_ref().received;
        if received != self.rx_seen {
            self.rx_seen = received;
            self.last_rx = now;
        }
        outcome
    }

    fn ping(&mut self, now: Instant, interval: Duration) -> Outcome {
        self.ping_due = now + interval;
        match self.ws.write(Message::Ping(Bytes::new())) {
            Ok(()) => self.do_write(),
            // Queued behind a full socket; WRITABLE will carry it.
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.flush_pending = true;
                Outcome::Fine
            }
            // A stuck peer: no room for the ping. The dead-socket check decides.
            Err(WsError::WriteBufferFull(_)) => Outcome::Fine,
            Err(e) => Outcome::Lost(describe_ws_error(&e)),
        }
    }

    /// Close frame (and TLS close_notify) best effort, for a link we are dropping.
    fn say_goodbye(&mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = self.ws.close(Some(frame));
        self.ws.get_mut().close_notify();
    }
}

enum State {
    /// Not started, or closed for shutdown.
    Disabled,
    Resolving {
        rx: Receiver<DnsAnswer>,
        deadline: Instant,
    },
    TcpConnecting {
        stream: TcpStream,
        addr: SocketAddr,
        remaining: VecDeque<SocketAddr>,
        deadline: Instant,
    },
    /// TLS handshake and HTTP upgrade, both resumable, in one tungstenite machine.
    Handshaking {
        mid: Box<MidHandshake<ClientHandshake<Wire>>>,
        deadline: Instant,
    },
    Open(Box<OpenLink>),
    /// The server sent a close frame; our reply goes out and we wait briefly for its FIN.
    Closing {
        ws: Box<WebSocket<Wire>>,
        deadline: Instant,
        reconnect_at: Instant,
    },
    Backoff {
        until: Instant,
    },
    Failed,
}

/// The Realtime connection. See the module header for the policy.
pub struct Link {
    settings: LinkSettings,
    waker: Arc<Waker>,
    endpoint: Option<Endpoint>,
    tls_config: Option<Arc<ClientConfig>>,
    state: State,
    /// The interest the current socket is registered with, `None` when none is.
    registered: Option<Interest>,
    events: VecDeque<LinkEvent>,
    last_error: Option<String>,
    /// Consecutive unsuccessful connections: the backoff exponent.
    failures: u32,
    connect_timeout: Duration,
}

impl Link {
    /// A link that does nothing until [`Link::start`].
    pub fn new(settings: LinkSettings, waker: Arc<Waker>) -> Link {
        Link {
            settings,
            waker,
            endpoint: None,
            tls_config: None,
            state: State::Disabled,
            registered: None,
            events: VecDeque::new(),
            last_error: None,
            failures: 0,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }

    /// Begins connecting; a no-op unless the link is `Disabled`.
    pub fn start(&mut self, registry: &Registry, now: Instant) {
        if matches!(self.state, State::Disabled) {
            self.begin(registry, now);
        }
    }

    pub fn on_ready(&mut self, registry: &Registry, event: &Event, now: Instant) {
        if event.token() != LINK {
            return;
        }
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        match &mut self.state {
            State::TcpConnecting { .. } => self.finish_tcp_connect(registry, now),
            State::Handshaking { .. } => self.advance_handshake(registry, now, event.is_writable()),
            State::Open(open) => {
                let mut outcome = Outcome::Fine;
                if event.is_writable() {
                    outcome = open.do_write();
                }
                if readable && matches!(outcome, Outcome::Fine) {
                    outcome = open.do_read(now, &mut self.events);
                }
                self.settle(registry, now, outcome);
            }
            State::Closing { .. } => self.service_closing(registry, now),
            // A stale event for a socket already dropped.
            _ => {}
        }
    }

    /// The loop was woken: the DNS answer may be in.
    pub fn on_wake(&mut self, registry: &Registry, now: Instant) {
        let State::Resolving { rx, .. } = &self.state else {
            return;
        };
        let answer = match rx.try_recv() {
            Ok(answer) => answer,
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => {
                Err(io::Error::other("the DNS helper ended without an answer"))
            }
        };
        let Some(endpoint) = self.endpoint.clone() else {
            return;
        };
        let addrs = match answer {
            Ok(addrs) => addrs,
            Err(e) => {
                let reason = format!("cannot resolve {}: {e}", endpoint.host);
                return self.lost(registry, now, reason);
            }
        };
        let found = addrs.len();
        let addrs: VecDeque<SocketAddr> = addrs
            .into_iter()
            .filter(|a| endpoint.secure || a.ip().is_loopback())
            .collect();
        if addrs.is_empty() {
            if found > 0 {
                let reason = format!(
                    "{} does not resolve to a loopback address; ws:// is only allowed to loopback",
                    endpoint.host
                );
                return self.fatal(registry, reason);
            }
            let reason = format!("{} has no address", endpoint.host);
            return self.lost(registry, now, reason);
        }
        self.state = State::Disabled;
        self.connect_next(registry, now, addrs, None);
    }

    /// Pings, the dead-socket check, backoff expiry and connect timeouts.
    pub fn on_timeout(&mut self, registry: &Registry, now: Instant) {
        let interval = self.settings.ping_interval;
        match &mut self.state {
            // A refusal whose body never finished arriving is judged on what came.
            State::Handshaking { mid, deadline } if now >= *deadline => {
                let held = (mid.get_ref().get_ref().gate.as_ref()).and_then(UpgradeGate::refusal);
                match held {
                    Some((status, body)) => self.refused(registry, now, status, &body),
                    None => {
                        let reason = format!(
                            "connecting to {} timed out after {}",
                            self.endpoint_name(),
                            human(self.connect_timeout)
                        );
                        self.lost(registry, now, reason);
                    }
                }
            }
            State::Resolving { deadline, .. } if now >= *deadline => {
                let reason = format!(
                    "connecting to {} timed out after {}",
                    self.endpoint_name(),
                    human(self.connect_timeout)
                );
                self.lost(registry, now, reason);
            }
            State::TcpConnecting { deadline, .. } if now >= *deadline => {
                let State::TcpConnecting {
                    stream,
                    addr,
                    remaining,
                    ..
                } = mem::replace(&mut self.state, State::Disabled)
                else {
                    return;
                };
                self.forget_socket(registry, stream);
                let error = format!("{addr}: timed out after {}", human(self.connect_timeout));
                self.connect_next(registry, now, remaining, Some(error));
            }
            State::Open(open) if !interval.is_zero() => {
                let silent = now.saturating_duration_since(open.last_rx);
                if silent >= interval * 2 {
                    let reason = format!("no data from the server for {}", human(silent));
                    self.lost(registry, now, reason);
                } else if now >= open.ping_due {
                    let outcome = open.ping(now, interval);
                    self.settle(registry, now, outcome);
                }
            }
            State::Closing {
                deadline,
                reconnect_at,
                ..
            } if now >= (*deadline).min(*reconnect_at) => self.finish_closing(registry, now),
            State::Backoff { until } if now >= *until => self.begin(registry, now),
            _ => {}
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Disabled | State::Failed => None,
            State::Resolving { deadline, .. }
            | State::TcpConnecting { deadline, .. }
            | State::Handshaking { deadline, .. } => Some(*deadline),
            State::Open(_) if self.settings.ping_interval.is_zero() => None,
            State::Open(open) => Some(
                open.ping_due
                    .min(open.last_rx + self.settings.ping_interval * 2),
            ),
            State::Closing {
                deadline,
                reconnect_at,
                ..
            } => Some((*deadline).min(*reconnect_at)),
            State::Backoff { until } => Some(*until),
        }
    }

    /// Queues one text frame and starts sending it at once; the rest goes on WRITABLE.
    pub fn send_text(&mut self, registry: &Registry, text: String) -> Result<(), SendError> {
        let State::Open(open) = &mut self.state else {
            return Err(SendError::NotOpen);
        };
        let outcome = match open.ws.write(Message::text(text)) {
            Ok(()) => open.do_write(),
            // The frame is queued; the socket is full.
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                open.flush_pending = true;
                Outcome::Fine
            }
            Err(WsError::WriteBufferFull(_)) => return Err(SendError::Backpressure),
            Err(e) => Outcome::Lost(describe_ws_error(&e)),
        };
        let dropped = matches!(outcome, Outcome::Lost(_));
        // Only a lost connection needs the clock (for the backoff deadline).
        self.settle(registry, Instant::now(), outcome);
        if dropped {
            Err(SendError::NotOpen)
        } else {
            Ok(())
        }
    }

    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    pub fn status(&self) -> LinkStatus {
        match &self.state {
            State::Disabled => LinkStatus::Disabled,
            State::Resolving { .. } | State::TcpConnecting { .. } | State::Handshaking { .. } => {
                LinkStatus::Connecting
            }
            State::Open(_) => LinkStatus::Connected,
            State::Closing { reconnect_at, .. } => LinkStatus::Backoff {
                until: *reconnect_at,
            },
            State::Backoff { until } => LinkStatus::Backoff { until: *until },
            State::Failed => LinkStatus::Failed,
        }
    }

    /// Why the link is not connected, if it is not (cleared when it opens).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The conversation saw a fatal error event: close, stay `Failed` until
    /// [`Link::reconnect_now`]. Emits `Failed` (so every way into the failed state looks the
    /// same to the daemon) and drops queued `Closed` events, which promised a reconnect.
    pub fn fail(&mut self, registry: &Registry, reason: String) {
        self.drop_connection(registry);
        self.events
            .retain(|e| !matches!(e, LinkEvent::Closed { .. }));
        self.fatal(registry, reason);
    }

    /// Session rotation or `session_expired`: close now and connect again without backoff,
    /// also out of `Failed`. Emits `Closed { reconnect_in: 0 }` when a session was up.
    pub fn reconnect_now(&mut self, registry: &Registry, now: Instant, reason: &str) {
        let had_session = matches!(self.state, State::Open(_) | State::Closing { .. });
        self.drop_connection(registry);
        self.failures = 0;
        if had_session {
            // A close frame may already have queued a Closed with a backoff; this one replaces it.
            self.events
                .retain(|e| !matches!(e, LinkEvent::Closed { .. }));
            let reason = self.redact(reason.to_owned());
            info!("realtime link reconnecting: {reason}");
            self.events.push_back(LinkEvent::Closed {
                reason,
                reconnect_in: Duration::ZERO,
            });
        }
        self.begin(registry, now);
    }

    /// Shutdown: a close frame best effort, then drop the socket. Ends `Disabled`.
    pub fn close(&mut self, registry: &Registry, _now: Instant) {
        self.drop_connection(registry);
        self.failures = 0;
    }

    // ----- transitions -----

    /// Starts a connection attempt from a state without a socket.
    fn begin(&mut self, registry: &Registry, now: Instant) {
        let endpoint = match &self.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => match Endpoint::parse(&self.settings.url) {
                Ok(endpoint) => {
                    self.endpoint = Some(endpoint.clone());
                    endpoint
                }
                Err(reason) => return self.fatal(registry, reason),
            },
        };
        if endpoint.secure && self.tls_config.is_none() {
            let config = tls::client_config(self.settings.ca_file.as_deref())
                .and_then(|config| tls::server_name(&endpoint.host).map(|_| config));
            match config {
                Ok(config) => self.tls_config = Some(config),
                Err(e) => return self.fatal(registry, e.to_string()),
            }
        }
        if let Ok(ip) = endpoint.host.parse::<IpAddr>() {
            let addrs = VecDeque::from([SocketAddr::new(ip, endpoint.port)]);
            return self.connect_next(registry, now, addrs, None);
        }
        match spawn_resolver(
            endpoint.host.clone(),
            endpoint.port,
            Arc::clone(&self.waker),
        ) {
            Ok(rx) => {
                self.state = State::Resolving {
                    rx,
                    deadline: now + self.connect_timeout,
                }
            }
            Err(e) => self.lost(registry, now, format!("cannot start the DNS lookup: {e}")),
        }
    }

    /// Connects to the next address, or gives the attempt up when none is left.
    fn connect_next(
        &mut self,
        registry: &Registry,
        now: Instant,
        mut remaining: VecDeque<SocketAddr>,
        mut last_error: Option<String>,
    ) {
        while let Some(addr) = remaining.pop_front() {
            let mut stream = match TcpStream::connect(addr) {
                Ok(stream) => stream,
                Err(e) => {
                    last_error = Some(format!("{addr}: {e}"));
                    continue;
                }
            };
            if let Err(e) = registry.register(&mut stream, LINK, Interest::WRITABLE) {
                last_error = Some(format!("{addr}: cannot watch the socket: {e}"));
                continue;
            }
            self.registered = Some(Interest::WRITABLE);
            self.state = State::TcpConnecting {
                stream,
                addr,
                remaining,
                deadline: now + self.connect_timeout,
            };
            return;
        }
        let reason = format!(
            "cannot connect to {}: {}",
            self.endpoint_name(),
            last_error.as_deref().unwrap_or("no address")
        );
        self.lost(registry, now, reason);
    }

    /// WRITABLE on a connecting socket: connected, failed, or a spurious wake-up.
    fn finish_tcp_connect(&mut self, registry: &Registry, now: Instant) {
        let State::TcpConnecting { stream, .. } = &mut self.state else {
            return;
        };
        let failure = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => None,
                Err(e)
                    if e.kind() == io::ErrorKind::NotConnected
                        || e.raw_os_error() == Some(libc::EINPROGRESS) =>
                {
                    return;
                }
                Err(e) => Some(e),
            },
        };
        let State::TcpConnecting {
            stream,
            addr,
            remaining,
            ..
        } = mem::replace(&mut self.state, State::Disabled)
        else {
            return;
        };
        match failure {
            Some(e) => {
                self.forget_socket(registry, stream);
                self.connect_next(registry, now, remaining, Some(format!("{addr}: {e}")));
            }
            None => self.start_handshake(registry, now, stream),
        }
    }

    fn start_handshake(&mut self, registry: &Registry, now: Instant, stream: TcpStream) {
        // Audio chunks are small and latency-bound: Nagle would hold them back.
        if let Err(e) = stream.set_nodelay(true) {
            debug!("TCP_NODELAY refused: {e}");
        }
        let prepared = self
            .endpoint
            .clone()
            .ok_or_else(|| "no realtime endpoint".to_owned())
            .and_then(|endpoint| Ok((endpoint, self.build_request()?)));
        let (endpoint, request) = match prepared {
            Ok(prepared) => prepared,
            Err(reason) => {
                self.forget_socket(registry, stream);
                return self.fatal(registry, reason);
            }
        };
        let transport = match (&self.tls_config, endpoint.secure) {
            (Some(config), true) => {
                let tls = tls::server_name(&endpoint.host)
                    .and_then(|name| TlsStream::new(Arc::clone(config), name, stream));
                match tls {
                    Ok(tls) => Transport::Tls(Box::new(tls)),
                    Err(e) => {
                        // The socket went down with the error; the kernel unregistered it.
                        self.registered = None;
                        return self.fatal(registry, e.to_string());
                    }
                }
            }
            _ => Transport::Plain(stream),
        };
        let config = WebSocketConfig::default()
            // Write frames through at once: send_text flushes immediately anyway, and
            // backpressure should count bytes the socket refused, not bytes held back.
            .write_buffer_size(0)
            .max_write_buffer_size(self.settings.max_write_buffer)
            .max_message_size(Some(MAX_MESSAGE_SIZE));
        let result = tungstenite::client::client_with_config(
            request,
            Wire::for_upgrade(transport),
            Some(config),
        );
        self.after_handshake_round(registry, now, result, now + self.connect_timeout);
    }

    fn advance_handshake(&mut self, registry: &Registry, now: Instant, writable: bool) {
        let State::Handshaking { mut mid, deadline } =
            mem::replace(&mut self.state, State::Disabled)
        else {
            return;
        };
        // The machine may sit in its reading stage while TLS records (the client Finished,
        // or the upgrade request released by it) wait: push them whatever the stage.
        if writable {
            if let Err(e) = mid.get_mut().get_mut().push_pending() {
                self.state = State::Handshaking { mid, deadline };
                let reason = format!("connection to {} failed: {e}", self.endpoint_name());
                return self.lost(registry, now, reason);
            }
        }
        let result = mid.handshake();
        self.after_handshake_round(registry, now, result, deadline);
    }

    fn after_handshake_round(
        &mut self,
        registry: &Registry,
        now: Instant,
        result: Result<(WebSocket<Wire>, Response), HandshakeError<ClientHandshake<Wire>>>,
        deadline: Instant,
    ) {
        match result {
            Ok((ws, _response)) => self.open(registry, now, ws),
            Err(HandshakeError::Interrupted(mid)) => {
                self.state = State::Handshaking {
                    mid: Box::new(mid),
                    deadline,
                };
                self.update_interest(registry, now);
            }
            Err(HandshakeError::Failure(e)) => {
                // tungstenite dropped the stream: closing the fd unregistered it.
                self.registered = None;
                self.state = State::Disabled;
                match e {
                    WsError::Http(response) => {
                        let chunked = response
                            .headers()
                            .get(TRANSFER_ENCODING)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
                        let raw = response.body().as_deref().unwrap_or_default();
                        let body = decode_body(raw, chunked);
                        self.refused(registry, now, response.status().as_u16(), &body);
                    }
                    other => {
                        let reason = format!(
                            "connecting to {} failed: {}",
                            self.endpoint_name(),
                            describe_ws_error(&other)
                        );
                        self.lost(registry, now, reason);
                    }
                }
            }
        }
    }

    fn open(&mut self, registry: &Registry, now: Instant, ws: WebSocket<Wire>) {
        info!("realtime link open to {}", self.endpoint_name());
        let mut open = Box::new(OpenLink {
            rx_seen: ws.get_ref().received,
            ws,
            opened_at: now,
            last_rx: now,
            ping_due: now + self.settings.ping_interval,
            flush_pending: false,
        });
        self.last_error = None;
        self.events.push_back(LinkEvent::Open);
        // Frames that came with the 101 response sit in tungstenite's or rustls' buffers
        // and no new edge will announce them: read now.
        let outcome = open.do_read(now, &mut self.events);
        self.state = State::Open(open);
        self.settle(registry, now, outcome);
    }

    /// Applies what servicing the open connection led to.
    fn settle(&mut self, registry: &Registry, now: Instant, outcome: Outcome) {
        match outcome {
            Outcome::Fine => self.update_interest(registry, now),
            Outcome::Lost(reason) => self.lost(registry, now, reason),
            Outcome::PeerClosed(reason) => self.begin_closing(registry, now, reason),
        }
    }

    fn begin_closing(&mut self, registry: &Registry, now: Instant, reason: String) {
        let State::Open(open) = mem::replace(&mut self.state, State::Disabled) else {
            return;
        };
        self.note_uptime(open.opened_at, now);
        let delay = self.next_backoff();
        let mut ws = open.ws;
        // tungstenite queued the close reply; reading (below) flushes it.
        let _ = ws.flush();
        self.state = State::Closing {
            ws: Box::new(ws),
            deadline: now + CLOSE_TIMEOUT,
            reconnect_at: now + delay,
        };
        self.report_closed(reason, delay);
        self.service_closing(registry, now);
    }

    /// Drives the close handshake until the server ends TCP.
    fn service_closing(&mut self, registry: &Registry, now: Instant) {
        let State::Closing { ws, .. } = &mut self.state else {
            return;
        };
        let _ = ws.get_mut().push_pending();
        let done = loop {
            match ws.read() {
                Ok(_) => {}
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        if done {
            self.finish_closing(registry, now);
        } else {
            self.update_interest(registry, now);
        }
    }

    fn finish_closing(&mut self, registry: &Registry, now: Instant) {
        let State::Closing { reconnect_at, .. } = self.state else {
            return;
        };
        self.drop_connection(registry);
        if now >= reconnect_at {
            self.begin(registry, now);
        } else {
            self.state = State::Backoff {
                until: reconnect_at,
            };
        }
    }

    /// The server answered the upgrade with an HTTP error. A bad key or an account problem
    /// (the body's error code, see [`FATAL_ERROR_CODES`]) is fatal: retrying cannot fix it
    /// and would only hammer the API. Anything else (a 429 rate limit, a 503) is transient.
    fn refused(&mut self, registry: &Registry, now: Instant, status: u16, body: &[u8]) {
        let refusal = Refusal::judge(status, body);
        if refusal.fatal {
            self.fatal(registry, refusal.reason);
        } else {
            self.lost(registry, now, refusal.reason);
        }
    }

    /// A transient failure: drop the socket, back off, report `Closed`.
    fn lost(&mut self, registry: &Registry, now: Instant, reason: String) {
        if let State::Open(open) = &self.state {
            self.note_uptime(open.opened_at, now);
        }
        self.discard(registry);
        let delay = self.next_backoff();
        self.state = State::Backoff { until: now + delay };
        self.report_closed(reason, delay);
    }

    /// A failure retrying cannot fix: drop the socket, stay `Failed`, report it.
    fn fatal(&mut self, registry: &Registry, reason: String) {
        self.discard(registry);
        self.state = State::Failed;
        let reason = self.redact(reason);
        error!("realtime link failed: {reason}");
        self.last_error = Some(reason.clone());
        self.events.push_back(LinkEvent::Failed { reason });
    }

    fn report_closed(&mut self, reason: String, reconnect_in: Duration) {
        let reason = self.redact(reason);
        warn!(
            "realtime link closed: {reason}; reconnecting in {}",
            human(reconnect_in)
        );
        self.last_error = Some(reason.clone());
        self.events.push_back(LinkEvent::Closed {
            reason,
            reconnect_in,
        });
    }

    /// Says goodbye on an open link, then drops whatever socket the state holds.
    fn drop_connection(&mut self, registry: &Registry) {
        if let State::Open(open) = &mut self.state {
            open.say_goodbye();
        }
        self.discard(registry);
    }

    /// Drops the state's socket (if any), leaving `Disabled`.
    fn discard(&mut self, registry: &Registry) {
        if let Some(sock) = socket_of(&mut self.state) {
            if self.registered.is_some() {
                let _ = registry.deregister(sock);
            }
        }
        self.registered = None;
        self.state = State::Disabled;
    }

    fn forget_socket(&mut self, registry: &Registry, mut stream: TcpStream) {
        if self.registered.take().is_some() {
            let _ = registry.deregister(&mut stream);
        }
    }

    /// A connection that stayed up long enough resets the backoff.
    fn note_uptime(&mut self, opened_at: Instant, now: Instant) {
        if now.saturating_duration_since(opened_at) >= STABLE_AFTER {
            self.failures = 0;
        }
    }

    /// The next reconnect delay: doubling from `backoff_min` to `backoff_max`, ±25 % jitter
    /// so clients cut off together do not come back in lock-step.
    fn next_backoff(&mut self) -> Duration {
        let max = self.settings.backoff_max;
        let min = self.settings.backoff_min.min(max);
        let exponent = self.failures.min(30);
        self.failures = self.failures.saturating_add(1);
        let base = min.saturating_mul(1u32 << exponent).min(max);
        let jittered =
            Duration::try_from_secs_f64(base.as_secs_f64() * (0.75 + fastrand::f64() * 0.5))
                .unwrap_or(max);
        jittered.clamp(min, max)
    }

    /// Derives the socket's interest from the state and re-registers when it changed.
    fn update_interest(&mut self, registry: &Registry, now: Instant) {
        let read_write = |write: bool| {
            if write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            }
        };
        let wanted = match &self.state {
            State::TcpConnecting { .. } => Interest::WRITABLE,
            State::Handshaking { mid, .. } => read_write(mid.get_ref().get_ref().needs_writable()),
            State::Open(open) => {
                read_write(open.flush_pending || open.ws.get_ref().needs_writable())
            }
            State::Closing { ws, .. } => read_write(ws.get_ref().needs_writable()),
            _ => return,
        };
        if self.registered == Some(wanted) {
            return;
        }
        let Some(sock) = socket_of(&mut self.state) else {
            return;
        };
        let result = match self.registered {
            Some(_) => registry.reregister(sock, LINK, wanted),
            None => registry.register(sock, LINK, wanted),
        };
        match result {
            Ok(()) => self.registered = Some(wanted),
            Err(e) => self.lost(registry, now, format!("cannot watch the socket: {e}")),
        }
    }

    fn build_request(&self) -> Result<Request, String> {
        let endpoint = self.endpoint.as_ref().ok_or("no endpoint")?;
        let mut request = endpoint
            .uri
            .clone()
            .into_client_request()
            .map_err(|e| format!("the realtime URL cannot be used for a WebSocket: {e}"))?;
        if let Some(key) = &self.settings.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                "the API key holds characters not allowed in an HTTP header".to_owned()
            })?;
            value.set_sensitive(true);
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        Ok(request)
    }

    fn endpoint_name(&self) -> String {
        match &self.endpoint {
            Some(e) if e.host.contains(':') => format!("[{}]:{}", e.host, e.port),
            Some(e) => format!("{}:{}", e.host, e.port),
            None => "the realtime server".to_owned(),
        }
    }

    /// Scrubs the API key from a message (nothing should put it there; this makes sure).
    fn redact(&self, text: String) -> String {
        match &self.settings.api_key {
            Some(key) if !key.is_empty() && text.contains(key.as_str()) => {
                text.replace(key.as_str(), "[redacted]")
            }
            _ => text,
        }
    }
}

fn socket_of(state: &mut State) -> Option<&mut TcpStream> {
    match state {
        State::TcpConnecting { stream, .. } => Some(stream),
        State::Handshaking { mid, .. } => Some(mid.get_mut().get_mut().socket()),
        State::Open(open) => Some(open.ws.get_mut().socket()),
        State::Closing { ws, .. } => Some(ws.get_mut().socket()),
        _ => None,
    }
}

/// `getaddrinfo` blocks: it runs on a helper thread that hands the answer back and wakes
/// the loop. If the link has moved on meanwhile, the answer falls on the floor.
fn spawn_resolver(host: String, port: u16, waker: Arc<Waker>) -> io::Result<Receiver<DnsAnswer>> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("walkie-dns".to_owned())
        .spawn(move || {
            let answer = (host.as_str(), port)
                .to_socket_addrs()
                .map(|addrs| addrs.collect());
            if tx.send(answer).is_ok() {
                let _ = waker.wake();
            }
        })?;
    Ok(rx)
}

fn describe_ws_error(e: &WsError) -> String {
    match e {
        WsError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            "the server dropped the connection".to_owned()
        }
        WsError::Io(io) => io.to_string(),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "the connection is closed".to_owned(),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "the server dropped the connection without a close frame".to_owned()
        }
        WsError::Protocol(ProtocolError::HandshakeIncomplete) => {
            "the server closed the connection during the upgrade".to_owned()
        }
        WsError::Http(response) => format!("HTTP {}", response.status()),
        other => other.to_string(),
    }
}

fn describe_close(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if f.reason.is_empty() => format!("server closed the connection (code {})", f.code),
        Some(f) => format!(
            "server closed the connection (code {}: {})",
            f.code,
            f.reason.as_str()
        ),
        None => "server closed the connection (no code)".to_owned(),
    }
}

/// Longest server message quoted from a refused upgrade.
const REFUSAL_MESSAGE_CHARS: usize = 200;

/// What a refused upgrade means, from its status and its (OpenAI-style JSON) body:
/// `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
struct Refusal {
    fatal: bool,
    reason: String,
}

impl Refusal {
    fn judge(status: u16, body: &[u8]) -> Refusal {
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let error = json.as_ref().and_then(|v| v.get("error"));
        let field = |key: &str| {
            error
                .and_then(|e| e.get(key))
                .and_then(serde_json::Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let code = field("code");
        let kind = field("type");
        let fatal_code = [code, kind]
            .into_iter()
            .flatten()
            .find(|c| FATAL_ERROR_CODES.contains(c));
        let fatal = matches!(status, 401 | 403) || fatal_code.is_some();
        // The server's own words, bounded, redacted and printable (a plain-text or HTML
        // body is quoted only when there is no JSON).
        let message = match (json.is_some(), field("message")) {
            (_, Some(message)) => Some(message.to_owned()),
            (false, None) => Some(String::from_utf8_lossy(body).into_owned()),
            (true, None) => None,
        }
        .map(|m| {
            m.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
        })
        .map(|m| m.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|m| !m.is_empty())
        .map(|m| redact::excerpt(&m, REFUSAL_MESSAGE_CHARS, Keep::Head));
        let label = match fatal_code.or(code).or(kind) {
            Some(code) => format!("HTTP {status} {code}"),
            None => format!("HTTP {status}"),
        };
        let said = message.map(|m| format!(": {m}")).unwrap_or_default();
        let reason = match status {
            401 => format!("authentication refused ({label}){said}; check the API key"),
            403 => format!("access refused ({label}){said}"),
            _ if fatal => format!("the Realtime API refused walkie ({label}){said}; not retrying"),
            _ => format!("{label} at the WebSocket upgrade{said}"),
        };
        Refusal { fatal, reason }
    }
}

fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{Sender, channel};

    use mio::{Events, Poll};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ServerConfig, ServerConnection, StreamOwned};
    use tungstenite::handshake::server::{Request as ServerRequest, Response as ServerResponse};

    use crate::reactor::WAKER;

    const KEY: &str = "sk-test-7f3a9c1e5b2d4a60";
    const LIMIT: Duration = Duration::from_secs(10);

    fn settings(url: String) -> LinkSettings {
        LinkSettings {
            url,
            api_key: Some(KEY.to_owned()),
            ca_file: None,
            ping_interval: Duration::from_secs(60),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            max_write_buffer: 4 << 20,
        }
    }

    /// A `mio::Poll` loop around one `Link`, dispatching the way the daemon does.
    struct Harness {
        poll: Poll,
        events: Events,
        link: Link,
        seen: Vec<LinkEvent>,
        cursor: usize,
    }

    impl Harness {
        fn new(settings: LinkSettings) -> Harness {
            let poll = Poll::new().unwrap();
            let waker = Arc::new(Waker::new(poll.registry(), WAKER).unwrap());
            Harness {
                poll,
                events: Events::with_capacity(64),
                link: Link::new(settings, waker),
                seen: Vec::new(),
                cursor: 0,
            }
        }

        fn started(settings: LinkSettings) -> Harness {
            let mut h = Harness::new(settings);
            h.link.start(h.poll.registry(), Instant::now());
            h
        }

        fn turn(&mut self, cap: Duration) {
            let now = Instant::now();
            let timeout = match self.link.next_deadline() {
                Some(deadline) => deadline.saturating_duration_since(now).min(cap),
                None => cap,
            };
            match self.poll.poll(&mut self.events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.events.clear(),
                Err(e) => panic!("poll: {e}"),
            }
            let now = Instant::now();
            for event in self.events.iter() {
                match event.token() {
                    LINK => self.link.on_ready(self.poll.registry(), event, now),
                    WAKER => self.link.on_wake(self.poll.registry(), now),
                    _ => {}
                }
            }
            self.link.on_timeout(self.poll.registry(), Instant::now());
            self.collect();
        }

        fn collect(&mut self) {
            while let Some(event) = self.link.poll_event() {
                self.seen.push(event);
            }
        }

        /// Runs the loop until an event after the cursor matches; moves the cursor past it.
        fn wait_for(&mut self, what: &str, pred: impl Fn(&LinkEvent) -> bool) -> LinkEvent {
            let end = Instant::now() + LIMIT;
            loop {
                if let Some(i) = self.seen[self.cursor..].iter().position(&pred) {
                    self.cursor += i + 1;
                    return self.seen[self.cursor - 1].clone();
                }
                let now = Instant::now();
                assert!(now < end, "no {what} within {LIMIT:?}; saw {:?}", self.seen);
                self.turn(end - now);
            }
        }

        fn wait_open(&mut self) {
            self.wait_for("Open", |e| *e == LinkEvent::Open);
        }

        fn wait_closed(&mut self) -> String {
            match self.wait_for("Closed", |e| matches!(e, LinkEvent::Closed { .. })) {
                LinkEvent::Closed { reason, .. } => reason,
                _ => unreachable!(),
            }
        }

        fn wait_text(&mut self) -> String {
            match self.wait_for("Text", |e| matches!(e, LinkEvent::Text(_))) {
                LinkEvent::Text(text) => text,
                _ => unreachable!(),
            }
        }

        fn run_for(&mut self, d: Duration) {
            let end = Instant::now() + d;
            while let Some(left) = end
                .checked_duration_since(Instant::now())
                .filter(|l| !l.is_zero())
            {
                self.turn(left);
            }
        }

        fn send(&mut self, text: &str) -> Result<(), SendError> {
            self.link.send_text(self.poll.registry(), text.to_owned())
        }

        /// Every reason the link ever gave, for the no-key check.
        fn all_reasons(&self) -> Vec<String> {
            let mut out: Vec<String> = self
                .seen
                .iter()
                .filter_map(|e| match e {
                    LinkEvent::Closed { reason, .. } | LinkEvent::Failed { reason } => {
                        Some(reason.clone())
                    }
                    _ => None,
                })
                .collect();
            out.extend(self.link.last_error().map(str::to_owned));
            out
        }
    }

    trait Io: Read + Write + Send {}
    impl<T: Read + Write + Send> Io for T {}
    type ServerWs = tungstenite::WebSocket<Box<dyn Io>>;

    struct TestServer {
        port: u16,
        accepted: Arc<AtomicUsize>,
    }

    impl TestServer {
        /// Accepts on 127.0.0.1 forever; each connection runs `handler(index, stream)` on
        /// its own thread (TLS already wrapped around the stream when `tls` is set).
        fn spawn(
            tls: Option<Arc<ServerConfig>>,
            handler: impl Fn(usize, Box<dyn Io>) + Send + Sync + 'static,
        ) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let accepted = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&accepted);
            let handler = Arc::new(handler);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let index = counter.fetch_add(1, Ordering::SeqCst);
                    let handler = Arc::clone(&handler);
                    let tls = tls.clone();
                    thread::spawn(move || {
                        let io: Box<dyn Io> = match tls {
                            Some(config) => Box::new(StreamOwned::new(
                                ServerConnection::new(config).unwrap(),
                                stream,
                            )),
                            None => Box::new(stream),
                        };
                        handler(index, io);
                    });
                }
            });
            TestServer { port, accepted }
        }

        fn ws_url(&self) -> String {
            format!("ws://127.0.0.1:{}/v1/realtime?model=test", self.port)
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    /// The WebSocket upgrade, reporting the request headers (lower-case names).
    // The callback's error type is tungstenite's, not ours to shrink.
    #[allow(clippy::result_large_err)]
    fn accept(io: Box<dyn Io>) -> Option<(ServerWs, Vec<(String, String)>)> {
        let mut headers = Vec::new();
        let ws = tungstenite::accept_hdr(io, |req: &ServerRequest, resp: ServerResponse| {
            headers = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            Ok(resp)
        })
        .ok()?;
        Some((ws, headers))
    }

    /// Answers every text frame with "echo:" + text until the client goes away.
    fn echo(ws: &mut ServerWs) {
        loop {
            match ws.read() {
                Ok(Message::Text(text)) => {
                    if ws.send(Message::text(format!("echo:{text}"))).is_err() {
                        return;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn echo_server(tls: Option<Arc<ServerConfig>>) -> TestServer {
        TestServer::spawn(tls, |_, io| {
            if let Some((mut ws, _)) = accept(io) {
                echo(&mut ws);
            }
        })
    }

    /// A self-signed certificate for localhost and 127.0.0.1, as the server's identity and
    /// as a PEM file the client may trust through `ca_file`.
    struct Cert {
        _dir: tempfile::TempDir,
        ca_file: PathBuf,
        server: Arc<ServerConfig>,
    }

    fn cert() -> Cert {
        let key = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, key.cert.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![key.cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der())),
            )
            .unwrap();
        Cert {
            _dir: dir,
            ca_file,
            server: Arc::new(server),
        }
    }

    fn assert_no_key(h: &Harness) {
        for reason in h.all_reasons() {
            assert!(!reason.contains(KEY), "API key leaked into {reason:?}");
        }
    }

    #[test]
    fn plain_ws_opens_sends_the_key_and_exchanges_text() {
        let (headers_tx, headers_rx) = channel();
        let server = TestServer::spawn(None, move |_, io| {
            if let Some((mut ws, headers)) = accept(io) {
                headers_tx.send(headers).unwrap();
                echo(&mut ws);
            }
        });
        let mut h = Harness::new(settings(server.ws_url()));
        assert_eq!(h.link.status(), LinkStatus::Disabled);
        assert_eq!(h.send("early"), Err(SendError::NotOpen));
        h.link.start(h.poll.registry(), Instant::now());
        assert_eq!(h.link.status(), LinkStatus::Connecting);
        assert_eq!(h.send("too early"), Err(SendError::NotOpen));
        h.wait_open();
        assert_eq!(h.link.status(), LinkStatus::Connected);
        let headers = headers_rx.recv_timeout(LIMIT).unwrap();
        let auth: Vec<_> = headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .collect();
        assert_eq!(auth.len(), 1);
        assert_eq!(auth[0].1, format!("Bearer {KEY}"));
        assert!(
            !headers.iter().any(|(k, _)| k == "openai-beta"),
            "{headers:?}"
        );

        h.send("hello").unwrap();
        h.send("world").unwrap();
        assert_eq!(h.wait_text(), "echo:hello");
        assert_eq!(h.wait_text(), "echo:world");
        assert_eq!(server.accepted(), 1);
    }

    #[test]
    fn wss_with_ca_file_resolves_localhost_and_exchanges_large_frames() {
        let cert = cert();
        let big_from_server = "s".repeat(1 << 20);
        let expected = big_from_server.clone();
        let server = TestServer::spawn(Some(Arc::clone(&cert.server)), move |_, io| {
            if let Some((mut ws, _)) = accept(io) {
                ws.send(Message::text(big_from_server.clone())).unwrap();
                echo(&mut ws);
            }
        });
        let mut s = settings(format!("wss://localhost:{}/v1/realtime", server.port));
        s.ca_file = Some(cert.ca_file.clone());
        let mut h = Harness::started(s);
        // "localhost" is a name: the DNS helper thread answers, possibly ::1 first (no
        // listener there), so the link must also fall back to the next address.
        h.wait_open();
        assert_eq!(h.wait_text(), expected);
        let big_from_client: String = (0..(1 << 20))
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect();
        h.send(&big_from_client).unwrap();
        assert_eq!(h.wait_text(), format!("echo:{big_from_client}"));
        assert_no_key(&h);
    }

    #[test]
    fn a_burst_of_small_frames_is_drained_on_one_edge() {
        let cert = cert();
        let (release_tx, release_rx) = channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let server = TestServer::spawn(Some(Arc::clone(&cert.server)), move |_, io| {
            if let Some((mut ws, _)) = accept(io) {
                for i in 0..500 {
                    ws.write(Message::text(format!("frame {i}"))).unwrap();
                }
                ws.flush().unwrap();
                // Then silence with the socket open: no later edge can rescue an undrained read.
                let _ = release_rx.lock().unwrap().recv_timeout(LIMIT * 2);
            }
        });
        let mut s = settings(format!("wss://127.0.0.1:{}/", server.port));
        s.ca_file = Some(cert.ca_file.clone());
        let mut h = Harness::started(s);
        h.wait_open();
        for i in 0..500 {
            assert_eq!(h.wait_text(), format!("frame {i}"));
        }
        drop(release_tx);
    }

    #[test]
    fn close_1001_reports_the_code_and_reconnects() {
        let server = TestServer::spawn(None, |index, io| {
            if let Some((mut ws, _)) = accept(io) {
                if index == 0 {
                    let frame = CloseFrame {
                        code: CloseCode::Away,
                        reason: "session expired".into(),
                    };
                    ws.close(Some(frame)).unwrap();
                    // Complete the close handshake like a real server.
                    while ws.read().is_ok() {}
                } else {
                    echo(&mut ws);
                }
            }
        });
        let mut h = Harness::started(settings(server.ws_url()));
        h.wait_open();
        let reason = h.wait_closed();
        assert!(reason.contains("1001"), "{reason}");
        assert!(reason.contains("session expired"), "{reason}");
        assert!(matches!(
            h.link.status(),
            LinkStatus::Backoff { .. } | LinkStatus::Connecting
        ));
        h.wait_open();
        h.send("again").unwrap();
        assert_eq!(h.wait_text(), "echo:again");
        assert_eq!(server.accepted(), 2);
    }

    #[test]
    fn a_dropped_tcp_connection_reconnects() {
        let server = TestServer::spawn(None, |index, io| {
            if let Some((mut ws, _)) = accept(io) {
                if index > 0 {
                    echo(&mut ws);
                }
                // index 0: dropped without a close frame.
            }
        });
        let mut h = Harness::started(settings(server.ws_url()));
        h.wait_open();
        let reason = h.wait_closed();
        assert!(
            reason.contains("dropped") || reason.contains("reset"),
            "{reason}"
        );
        h.wait_open();
        h.send("back").unwrap();
        assert_eq!(h.wait_text(), "echo:back");
    }

    #[test]
    fn a_silent_server_is_detected_dead_and_replaced() {
        let server = TestServer::spawn(None, |index, io| {
            if let Some((mut ws, _)) = accept(io) {
                if index == 0 {
                    // Swallow everything (pings included) and never answer, TCP kept open.
                    let mut raw = ws.get_mut();
                    let mut buf = [0u8; 1024];
                    while matches!(raw.read(&mut buf), Ok(n) if n > 0) {
                        raw = ws.get_mut();
                    }
                } else {
                    echo(&mut ws);
                }
            }
        });
        let mut s = settings(server.ws_url());
        s.ping_interval = Duration::from_millis(200);
        let mut h = Harness::started(s);
        h.wait_open();
        let reason = h.wait_closed();
        assert!(reason.contains("no data"), "{reason}");
        h.wait_open();
        assert_eq!(server.accepted(), 2);
    }

    #[test]
    fn pings_keep_a_quiet_but_healthy_link_open() {
        // The echo server sends nothing by itself; only its pong answers prove it alive.
        let server = echo_server(None);
        let mut s = settings(server.ws_url());
        // Generous against a loaded machine: the pong may take up to one interval to arrive.
        s.ping_interval = Duration::from_millis(400);
        let mut h = Harness::started(s);
        h.wait_open();
        // Without pings the link would be declared dead after 800 ms.
        h.run_for(Duration::from_millis(2000));
        assert_eq!(h.link.status(), LinkStatus::Connected, "{:?}", h.seen);
        assert!(
            !h.seen.iter().any(|e| matches!(e, LinkEvent::Closed { .. })),
            "{:?}",
            h.seen
        );
        assert_eq!(server.accepted(), 1);
    }

    /// A raw HTTP server answering every upgrade with `status`; sends each request's text.
    fn http_status_server(
        status: &'static str,
        upgrade_after: usize,
        requests: Sender<String>,
    ) -> TestServer {
        TestServer::spawn(None, move |index, mut io| {
            if index >= upgrade_after {
                if let Some((mut ws, _)) = accept(io) {
                    echo(&mut ws);
                }
                return;
            }
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match io.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = requests.send(String::from_utf8_lossy(&request).into_owned());
            let reply =
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = io.write_all(reply.as_bytes());
        })
    }

    #[test]
    fn http_401_at_upgrade_fails_without_retry_or_key() {
        let (tx, requests) = channel();
        let server = http_status_server("401 Unauthorized", usize::MAX, tx);
        let mut h = Harness::started(settings(server.ws_url()));
        let LinkEvent::Failed { reason } =
            h.wait_for("Failed", |e| matches!(e, LinkEvent::Failed { .. }))
        else {
            unreachable!()
        };
        assert!(reason.contains("401"), "{reason}");
        assert!(reason.contains("API key"), "{reason}");
        assert_eq!(h.link.status(), LinkStatus::Failed);
        assert_eq!(h.link.last_error(), Some(reason.as_str()));
        assert_eq!(h.link.next_deadline(), None);
        let request = requests.recv_timeout(LIMIT).unwrap();
        assert!(request.contains(&format!("Bearer {KEY}")), "{request}");
        assert!(
            !request.to_ascii_lowercase().contains("openai-beta"),
            "{request}"
        );
        // Well past many backoff periods: still one connection.
        h.run_for(Duration::from_millis(400));
        assert_eq!(server.accepted(), 1);
        assert_eq!(h.link.status(), LinkStatus::Failed);
        assert_no_key(&h);
        // Only an explicit reconnect tries again.
        h.link
            .reconnect_now(h.poll.registry(), Instant::now(), "user asked");
        h.wait_for("Failed again", |e| matches!(e, LinkEvent::Failed { .. }));
        assert_eq!(server.accepted(), 2);
    }

    #[test]
    fn http_403_is_fatal_too() {
        let (tx, _requests) = channel();
        let server = http_status_server("403 Forbidden", usize::MAX, tx);
        let mut h = Harness::started(settings(server.ws_url()));
        let event = h.wait_for("Failed", |e| matches!(e, LinkEvent::Failed { .. }));
        assert!(matches!(event, LinkEvent::Failed { reason } if reason.contains("403")));
    }

    /// How a test server refuses an upgrade.
    #[derive(Clone)]
    struct Refuse {
        status: &'static str,
        body: String,
        /// A pause between the head and the body.
        split: Option<Duration>,
        chunked: bool,
        /// Bytes of the body actually sent (the rest never comes; the socket stays open).
        send_only: Option<usize>,
    }

    fn refusing_server(refuse: Refuse, upgrade_after: usize) -> TestServer {
        TestServer::spawn(None, move |index, mut io| {
            if index >= upgrade_after {
                if let Some((mut ws, _)) = accept(io) {
                    echo(&mut ws);
                }
                return;
            }
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match io.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let framing = if refuse.chunked {
                "Transfer-Encoding: chunked".to_owned()
            } else {
                format!("Content-Length: {}", refuse.body.len())
            };
            let head = format!(
                "HTTP/1.1 {}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n",
                refuse.status
            );
            let _ = io.write_all(head.as_bytes());
            let _ = io.flush();
            if let Some(pause) = refuse.split {
                thread::sleep(pause);
            }
            let mut body = refuse.body.clone().into_bytes();
            if refuse.chunked {
                let (a, b) = refuse.body.as_bytes().split_at(refuse.body.len() / 2);
                body = format!("{:x}\r\n", a.len()).into_bytes();
                body.extend_from_slice(a);
                body.extend_from_slice(format!("\r\n{:x}\r\n", b.len()).as_bytes());
                body.extend_from_slice(b);
                body.extend_from_slice(b"\r\n0\r\n\r\n");
            }
            match refuse.send_only {
                Some(n) => {
                    let _ = io.write_all(&body[..n.min(body.len())]);
                    let _ = io.flush();
                    thread::sleep(Duration::from_secs(30));
                }
                None => {
                    let _ = io.write_all(&body);
                    let _ = io.flush();
                }
            }
        })
    }

    fn quota_body() -> String {
        serde_json::json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}).to_string()
    }

    fn wait_failed(h: &mut Harness) -> String {
        match h.wait_for("Failed", |e| matches!(e, LinkEvent::Failed { .. })) {
            LinkEvent::Failed { reason } => reason,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_quota_refusal_is_fatal_even_when_its_body_comes_late() {
        for (split, chunked) in [
            (None, false),
            (Some(Duration::from_millis(300)), false),
            (Some(Duration::from_millis(300)), true),
        ] {
            let server = refusing_server(
                Refuse {
                    status: "429 Too Many Requests",
                    body: quota_body(),
                    split,
                    chunked,
                    send_only: None,
                },
                usize::MAX,
            );
            let mut h = Harness::started(settings(server.ws_url()));
            let reason = wait_failed(&mut h);
            assert!(
                reason.contains("HTTP 429 insufficient_quota")
                    && reason.contains("exceeded your current quota"),
                "{split:?} {chunked}: {reason}"
            );
            assert_eq!(h.link.status(), LinkStatus::Failed);
            assert_eq!(h.link.last_error(), Some(reason.as_str()));
            h.run_for(Duration::from_millis(400));
            assert_eq!(server.accepted(), 1, "no retry");
        }
    }

    #[test]
    fn other_fatal_codes_stop_the_link_and_a_rate_limit_does_not() {
        let model = serde_json::json!({"error": {"message": "The model `gpt-nope` does not exist.", "type": "invalid_request_error", "code": "model_not_found"}}).to_string();
        let server = refusing_server(
            Refuse {
                status: "404 Not Found",
                body: model,
                split: None,
                chunked: true,
                send_only: None,
            },
            usize::MAX,
        );
        let mut h = Harness::started(settings(server.ws_url()));
        assert!(wait_failed(&mut h).contains("model_not_found"));

        let limit = serde_json::json!({"error": {"message": "Rate limit reached for requests.", "type": "requests", "code": "rate_limit_exceeded"}}).to_string();
        let server = refusing_server(
            Refuse {
                status: "429 Too Many Requests",
                body: limit,
                split: None,
                chunked: false,
                send_only: None,
            },
            1,
        );
        let mut h = Harness::started(settings(server.ws_url()));
        let reason = h.wait_closed();
        assert!(
            reason.contains("HTTP 429 rate_limit_exceeded") && reason.contains("Rate limit"),
            "{reason}"
        );
        h.wait_open();
        assert_eq!(server.accepted(), 2);
    }

    #[test]
    fn a_refusal_body_is_read_bounded() {
        // A megabyte of body: judged on its first kilobytes, quoted short.
        let server = refusing_server(
            Refuse {
                status: "503 Service Unavailable",
                body: "x".repeat(1 << 20),
                split: None,
                chunked: false,
                send_only: None,
            },
            1,
        );
        let mut h = Harness::started(settings(server.ws_url()));
        let reason = h.wait_closed();
        assert!(
            reason.starts_with("HTTP 503 at the WebSocket upgrade: x"),
            "{reason}"
        );
        assert!(
            reason.chars().count() < 300,
            "{} chars",
            reason.chars().count()
        );
        h.wait_open();
        // A body that stops coming: the connect timeout judges what came.
        let server = refusing_server(
            Refuse {
                status: "429 Too Many Requests",
                body: quota_body(),
                split: None,
                chunked: false,
                send_only: Some(20),
            },
            usize::MAX,
        );
        let mut h = Harness::new(settings(server.ws_url()));
        h.link.connect_timeout = Duration::from_millis(300);
        h.link.start(h.poll.registry(), Instant::now());
        let reason = h.wait_closed();
        assert!(reason.contains("HTTP 429"), "{reason}");
    }

    #[test]
    fn refusals_are_judged_by_status_and_code() {
        let judge = |status, body: &str| Refusal::judge(status, body.as_bytes());
        let r = judge(
            401,
            r#"{"error":{"message":"Incorrect API key provided: sk-proj-AbCdEf0123456789abcdefGHIJKL.","type":"invalid_request_error","code":"invalid_api_key"}}"#,
        );
        assert!(r.fatal);
        assert!(
            r.reason.starts_with(
                "authentication refused (HTTP 401 invalid_api_key): Incorrect API key provided"
            ),
            "{}",
            r.reason
        );
        assert!(!r.reason.contains("AbCdEf0123"), "{}", r.reason);
        // The code may be in `type` only.
        assert!(
            judge(
                429,
                r#"{"error":{"message":"quota","type":"insufficient_quota","code":null}}"#
            )
            .fatal
        );
        assert!(!judge(429, r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#).fatal);
        assert!(judge(403, "").fatal);
        let r = judge(502, "<html>\x1b[2J bad\ngateway</html>");
        assert!(!r.fatal);
        assert_eq!(
            r.reason,
            "HTTP 502 at the WebSocket upgrade: <html> [2J bad gateway</html>"
        );
        assert_eq!(judge(500, "").reason, "HTTP 500 at the WebSocket upgrade");
    }

    #[test]
    fn the_upgrade_gate_holds_a_refusal_until_its_body_is_in() {
        let mut gate = UpgradeGate::default();
        let mut out = [0u8; 4096];
        gate.take(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(gate.release(&mut out), None, "held until the body is in");
        gate.take(b"0123456789");
        let head_len = gate.head.as_ref().unwrap().len;
        // The head but its last byte, then that byte with the whole body.
        assert_eq!(gate.release(&mut out), Some(head_len - 1));
        assert_eq!(gate.release(&mut out), Some(11));
        assert_eq!(&out[1..11], b"0123456789");
        assert_eq!(gate.release(&mut out), None);
        assert_eq!(gate.refusal(), Some((429, b"0123456789".to_vec())));
        // A 101 and the frames after it pass at once.
        let mut gate = UpgradeGate::default();
        gate.take(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi");
        let n = gate.release(&mut out).unwrap();
        assert!(out[..n].ends_with(b"\x81\x02hi"));
        assert!(gate.open());
        // Chunked: complete at the last chunk.
        assert_eq!(
            decode_chunked(b"3\r\nabc\r\n2\r\nde\r\n"),
            (b"abcde".to_vec(), false)
        );
        assert_eq!(
            decode_chunked(b"3\r\nabc\r\n0\r\n\r\n"),
            (b"abc".to_vec(), true)
        );
    }

    #[test]
    fn http_500_at_upgrade_is_retried() {
        let (tx, _requests) = channel();
        let server = http_status_server("500 Internal Server Error", 1, tx);
        let mut h = Harness::started(settings(server.ws_url()));
        let reason = h.wait_closed();
        assert!(reason.contains("500"), "{reason}");
        h.wait_open();
        assert_eq!(server.accepted(), 2);
        assert_no_key(&h);
    }

    #[test]
    fn an_untrusted_certificate_never_opens_and_says_why() {
        let cert = cert();
        let server = echo_server(Some(Arc::clone(&cert.server)));
        // No ca_file: the self-signed certificate is not in the webpki roots.
        let mut h = Harness::started(settings(format!("wss://127.0.0.1:{}/", server.port)));
        let reason = h.wait_closed();
        assert!(reason.contains("certificate"), "{reason}");
        assert!(
            h.link
                .last_error()
                .is_some_and(|e| e.contains("certificate"))
        );
        assert!(!h.seen.contains(&LinkEvent::Open));
        assert_no_key(&h);
    }

    #[test]
    fn a_peer_that_stops_reading_yields_backpressure_not_growth() {
        let (release_tx, release_rx) = channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let server = TestServer::spawn(None, move |_, io| {
            if let Some((_ws, _)) = accept(io) {
                let _ = release_rx.lock().unwrap().recv_timeout(LIMIT * 3);
            }
        });
        let mut s = settings(server.ws_url());
        s.max_write_buffer = 256 * 1024;
        let mut h = Harness::started(s);
        h.wait_open();
        let chunk = "a".repeat(64 * 1024);
        let mut sent = 0usize;
        let result = loop {
            match h.send(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) => break e,
            }
            // Kernel buffers take some megabytes; an unbounded queue would take them all.
            assert!(sent < 256 << 20, "no backpressure after {sent} bytes");
        };
        assert_eq!(result, SendError::Backpressure);
        assert_eq!(h.link.status(), LinkStatus::Connected);
        drop(release_tx);
    }

    #[test]
    fn reconnect_now_skips_the_backoff() {
        let server = echo_server(None);
        let mut s = settings(server.ws_url());
        // A backoff this long would time the test out: reconnect_now must not wait for it.
        s.backoff_min = Duration::from_secs(60);
        s.backoff_max = Duration::from_secs(60);
        let mut h = Harness::started(s);
        h.wait_open();
        h.link
            .reconnect_now(h.poll.registry(), Instant::now(), "session rotation");
        let event = h.wait_for("Closed", |e| matches!(e, LinkEvent::Closed { .. }));
        assert_eq!(
            event,
            LinkEvent::Closed {
                reason: "session rotation".to_owned(),
                reconnect_in: Duration::ZERO
            }
        );
        h.wait_open();
        h.send("fresh").unwrap();
        assert_eq!(h.wait_text(), "echo:fresh");
        assert_eq!(server.accepted(), 2);
    }

    #[test]
    fn fail_and_close_stop_the_link() {
        let server = echo_server(None);
        let mut h = Harness::started(settings(server.ws_url()));
        h.wait_open();
        h.link.fail(h.poll.registry(), "invalid_api_key".to_owned());
        assert_eq!(h.link.status(), LinkStatus::Failed);
        assert_eq!(h.link.next_deadline(), None);
        assert_eq!(h.send("x"), Err(SendError::NotOpen));
        h.collect();
        assert!(h.seen.contains(&LinkEvent::Failed {
            reason: "invalid_api_key".to_owned()
        }));
        h.run_for(Duration::from_millis(200));
        assert_eq!(server.accepted(), 1);

        h.link
            .reconnect_now(h.poll.registry(), Instant::now(), "retry");
        h.wait_open();
        h.link.close(h.poll.registry(), Instant::now());
        assert_eq!(h.link.status(), LinkStatus::Disabled);
        assert_eq!(h.link.next_deadline(), None);
        assert_eq!(h.send("x"), Err(SendError::NotOpen));
    }

    #[test]
    fn bad_urls_fail_without_connecting() {
        for (url, needle) in [
            ("ws://example.com/v1/realtime", "loopback"),
            ("http://127.0.0.1:1/", "wss://"),
            ("not a url", "not a valid URL"),
        ] {
            let mut h = Harness::started(settings(url.to_owned()));
            h.collect();
            assert_eq!(h.link.status(), LinkStatus::Failed, "{url}");
            let reason = h.link.last_error().unwrap_or_default().to_owned();
            assert!(reason.contains(needle), "{url}: {reason}");
            assert!(
                matches!(&h.seen[..], [LinkEvent::Failed { .. }]),
                "{url}: {:?}",
                h.seen
            );
        }
        let mut s = settings("wss://127.0.0.1:1/".to_owned());
        s.ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
        let h = Harness::started(s);
        assert_eq!(h.link.status(), LinkStatus::Failed);
        assert!(h.link.last_error().unwrap_or_default().contains("CA file"));
    }

    #[test]
    fn refused_connections_back_off_exponentially() {
        // Bind then drop: nothing listens on that port.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = settings(format!("ws://127.0.0.1:{port}/"));
        s.backoff_min = Duration::from_millis(10);
        s.backoff_max = Duration::from_millis(80);
        let mut h = Harness::started(s);
        let mut delays = Vec::new();
        for _ in 0..5 {
            match h.wait_for("Closed", |e| matches!(e, LinkEvent::Closed { .. })) {
                LinkEvent::Closed {
                    reason,
                    reconnect_in,
                } => {
                    assert!(reason.contains("cannot connect"), "{reason}");
                    delays.push(reconnect_in);
                }
                _ => unreachable!(),
            }
        }
        // ±25 % jitter around 10, 20, 40, 80, 80 ms, clamped to [10, 80].
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert!(ms[0] <= 13 && ms[2] >= 30 && ms[2] <= 50, "{ms:?}");
        assert!(
            ms[3] >= 60 && ms[4] >= 60 && ms.iter().all(|&d| (10..=80).contains(&d)),
            "{ms:?}"
        );
    }

    #[test]
    fn endpoints_default_ports_and_accept_loopback_names() {
        let e = Endpoint::parse("wss://api.openai.com/v1/realtime?model=gpt-realtime").unwrap();
        assert!(e.secure);
        assert_eq!((e.host.as_str(), e.port), ("api.openai.com", 443));
        let e = Endpoint::parse("ws://[::1]:8080/v1/realtime").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.secure), ("::1", 8080, false));
        let e = Endpoint::parse("ws://LOCALHOST/").unwrap();
        assert_eq!(e.port, 80);
        assert!(Endpoint::parse("ws://10.0.0.1:80/").is_err());
        assert!(Endpoint::parse("wss:///path").is_err());
    }

    #[test]
    fn settings_debug_hides_the_key() {
        let text = format!("{:?}", settings("wss://x/".to_owned()));
        assert!(!text.contains(KEY), "{text}");
    }
}
