//! The bench's Realtime server: the GA events walkie and the peer exchange in the scenarios,
//! over TLS on loopback, stamping every frame it reads and writes with CLOCK_MONOTONIC at
//! the socket.
//!
//! Why not tools/fake-realtime: that server checks every event against the GA shapes,
//! writes each to its record file before the next, and applies control commands between
//! 20 ms read timeouts — right for tests, but its own latency would be in every figure.
//! This one is a single mio loop thread that does nothing else: a frame is stamped when
//! tungstenite hands it over (its last byte read) or right after it was written to the
//! socket, and deltas leave on a timer of their own.
//!
//! It answers what the subjects need (`session.created`/`updated`, the input buffer
//! acknowledgements, `response.create` as scripted, `response.cancel`, truncation) and
//! records what they send: audio appends (with their first and last sample), tool outputs
//! by `call_id`, and every event type with its arrival time.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::{Value, json};
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::MidHandshake;
use tungstenite::handshake::server::{NoCallback, ServerHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::clock::now_ns;
use crate::tls::{TlsIo, server_config};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// An `input_audio_buffer.append` as it arrived: when, and its last sample.
#[derive(Debug, Clone)]
pub struct Append {
    pub t_ns: u64,
    pub last: i16,
}

/// A client event as it arrived (audio left out).
#[derive(Debug, Clone)]
pub struct Received {
    pub t_ns: u64,
    pub kind: String,
    /// `call_id` of a `function_call_output` item.
    pub call_id: Option<String>,
}

/// What the server saw, shared with the scenarios.
#[derive(Debug, Default)]
pub struct Inbox {
    pub appends: Vec<Append>,
    pub events: Vec<Received>,
    /// Upgrades completed so far.
    pub connections: u64,
    /// A `session.update` arrived on the newest connection.
    pub session_ready: bool,
}

/// How `response.create` is answered.
#[derive(Debug, Clone, Copy)]
pub enum AutoReply {
    /// `response.created` and `response.done` at once (no output).
    Empty,
    /// A spoken answer of this many ms of tone, deltas of 100 ms every 25 ms.
    Speak(u64),
}

/// When the deltas of a spoken response left, and how it ended.
#[derive(Debug, Clone, Default)]
pub struct SpeakReport {
    /// Send time of each delta, and the samples in the stream after it (cumulative).
    pub deltas: Vec<(u64, u64)>,
    pub cancelled: bool,
}

enum Cmd {
    Speak {
        pcm: Vec<i16>,
        chunk: usize,
        interval: Duration,
        reply: Option<Sender<SpeakReport>>,
    },
    Call {
        name: String,
        arguments: String,
        call_id: String,
        reply: Sender<u64>,
    },
    AutoReply(AutoReply),
    Stop,
}

/// The server, running on its own thread until dropped.
pub struct Server {
    pub url: String,
    pub ca_file: PathBuf,
    pub inbox: Arc<Mutex<Inbox>>,
    tx: Sender<Cmd>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Result<Server, String> {
        let (config, ca_pem) = server_config()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ca_file = dir.path().join("bench-ca.pem");
        std::fs::write(&ca_file, ca_pem).map_err(|e| e.to_string())?;
        let mut listener = TcpListener::bind("127.0.0.1:0".parse().expect("address"))
            .map_err(|e| format!("bench server: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let poll = Poll::new().map_err(|e| e.to_string())?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| e.to_string())?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| e.to_string())?);
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let (tx, rx) = mpsc::channel();
        let mut state = Loop {
            poll,
            listener,
            config,
            rx,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            current: None,
            inbox: Arc::clone(&inbox),
            speak: None,
            auto: AutoReply::Empty,
            ids: 0,
        };
        let thread = std::thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || {
                crate::clock::try_real_time(10);
                state.run();
            })
            .map_err(|e| e.to_string())?;
        Ok(Server {
            url: format!("wss://localhost:{port}/v1/realtime"),
            ca_file,
            inbox,
            tx,
            waker,
            thread: Some(thread),
            _dir: dir,
        })
    }

    fn command(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd);
        let _ = self.waker.wake();
    }

    /// Starts a spoken response: `pcm` in deltas of `chunk` samples every `interval`.
    /// The report comes on the returned channel when the response ends.
    pub fn speak(&self, pcm: Vec<i16>, chunk: usize, interval: Duration) -> Receiver<SpeakReport> {
        let (tx, rx) = mpsc::channel();
        self.command(Cmd::Speak {
            pcm,
            chunk,
            interval,
            reply: Some(tx),
        });
        rx
    }

    /// Makes a function call; returns when `response.function_call_arguments.done` left.
    pub fn call(&self, name: &str, arguments: Value, call_id: &str) -> Option<u64> {
        let (tx, rx) = mpsc::channel();
        self.command(Cmd::Call {
            name: name.to_owned(),
            arguments: arguments.to_string(),
            call_id: call_id.to_owned(),
            reply: tx,
        });
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    pub fn auto_reply(&self, auto: AutoReply) {
        self.command(Cmd::AutoReply(auto));
    }

    /// Waits until a subject's session is configured (its `session.update` arrived).
    pub fn wait_session(&self, timeout: Duration) -> bool {
        let end = now_ns() + timeout.as_nanos() as u64;
        while now_ns() < end {
            if self.inbox.lock().expect("inbox").session_ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// When the `function_call_output` for `call_id` arrived.
    pub fn output_time(&self, call_id: &str) -> Option<u64> {
        let inbox = self.inbox.lock().expect("inbox");
        inbox
            .events
            .iter()
            .find(|e| e.call_id.as_deref() == Some(call_id))
            .map(|e| e.t_ns)
    }

    /// The first event of `kind` that arrived at or after `since`.
    pub fn first_event(&self, kind: &str, since: u64) -> Option<u64> {
        let inbox = self.inbox.lock().expect("inbox");
        inbox
            .events
            .iter()
            .find(|e| e.t_ns >= since && e.kind == kind)
            .map(|e| e.t_ns)
    }

    /// Forgets what arrived so far (between phases of a scenario).
    pub fn clear_inbox(&self) {
        let mut inbox = self.inbox.lock().expect("inbox");
        inbox.appends.clear();
        inbox.events.clear();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.command(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum ConnState {
    Handshaking(Box<MidHandshake<ServerHandshake<TlsIo, NoCallback>>>),
    Open(Box<WebSocket<TlsIo>>),
    Closed,
}

struct Speaking {
    response: String,
    item: String,
    pcm: Vec<i16>,
    pos: usize,
    chunk: usize,
    interval_ns: u64,
    next_ns: u64,
    report: SpeakReport,
    reply: Option<Sender<SpeakReport>>,
}

struct Loop {
    poll: Poll,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    rx: Receiver<Cmd>,
    conns: HashMap<Token, ConnState>,
    next_token: usize,
    current: Option<Token>,
    inbox: Arc<Mutex<Inbox>>,
    speak: Option<Speaking>,
    auto: AutoReply,
    ids: u64,
}

fn ws_config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(64 << 20);
    c.max_frame_size = Some(64 << 20);
    c
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            let timeout = self
                .speak
                .as_ref()
                .map(|s| Duration::from_nanos(s.next_ns.saturating_sub(now_ns())));
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != ErrorKind::Interrupted
            {
                eprintln!("rt-bench: server poll: {e}");
                return;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {
                        while let Ok(cmd) = self.rx.try_recv() {
                            if !self.command(cmd) {
                                return;
                            }
                        }
                    }
                    t => self.on_conn(t),
                }
            }
            self.speak_due();
        }
    }

    fn id(&mut self, prefix: &str) -> String {
        self.ids += 1;
        format!("{prefix}_{}", self.ids)
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    if self
                        .poll
                        .registry()
                        .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    let Ok(tls) = rustls::ServerConnection::new(Arc::clone(&self.config)) else {
                        continue;
                    };
                    let io = TlsIo { tls, sock };
                    let state = match tungstenite::accept_with_config(io, Some(ws_config())) {
                        Ok(ws) => ConnState::Open(Box::new(ws)),
                        Err(HandshakeError::Interrupted(mid)) => {
                            ConnState::Handshaking(Box::new(mid))
                        }
                        Err(HandshakeError::Failure(_)) => ConnState::Closed,
                    };
                    let opened = matches!(state, ConnState::Open(_));
                    self.conns.insert(token, state);
                    if opened {
                        self.opened(token);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return,
            }
        }
    }

    fn opened(&mut self, token: Token) {
        self.current = Some(token);
        {
            let mut inbox = self.inbox.lock().expect("inbox");
            inbox.connections += 1;
            inbox.session_ready = false;
        }
        let id = self.id("sess");
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() + 3600)
            .unwrap_or(0);
        self.send_to(
            token,
            &json!({"type": "session.created", "event_id": "ev_0", "session": {
                "id": id, "object": "realtime.session", "type": "realtime",
                "model": "gpt-realtime", "expires_at": expires,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                          "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}}}}),
        );
    }

    fn on_conn(&mut self, token: Token) {
        let Some(state) = self.conns.remove(&token) else {
            return;
        };
        let state = match state {
            ConnState::Handshaking(mid) => match (*mid).handshake() {
                Ok(ws) => {
                    self.conns.insert(token, ConnState::Open(Box::new(ws)));
                    self.opened(token);
                    // The client may have sent its first event with the upgrade's tail.
                    self.read_conn(token);
                    return;
                }
                Err(HandshakeError::Interrupted(mid)) => ConnState::Handshaking(Box::new(mid)),
                Err(HandshakeError::Failure(_)) => ConnState::Closed,
            },
            other => other,
        };
        self.conns.insert(token, state);
        self.read_conn(token);
    }

    fn read_conn(&mut self, token: Token) {
        let mut texts = Vec::new();
        let mut closed = false;
        if let Some(ConnState::Open(ws)) = self.conns.get_mut(&token) {
            loop {
                match ws.read() {
                    Ok(Message::Text(t)) => texts.push((now_ns(), t.to_string())),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if !closed {
                let _ = ws.flush();
            }
        }
        if closed {
            self.conns.insert(token, ConnState::Closed);
        }
        for (t, text) in texts {
            self.on_text(token, t, &text);
        }
    }

    fn on_text(&mut self, token: Token, t: u64, text: &str) {
        let Ok(ev) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let kind = ev["type"].as_str().unwrap_or("").to_owned();
        let mut call_id = None;
        match kind.as_str() {
            "input_audio_buffer.append" => {
                let b64 = base64::engine::general_purpose::STANDARD;
                if let Ok(bytes) = b64.decode(ev["audio"].as_str().unwrap_or("")) {
                    let n = bytes.len() / 2;
                    if n > 0 {
                        let a = Append {
                            t_ns: t,
                            last: i16::from_le_bytes([bytes[2 * n - 2], bytes[2 * n - 1]]),
                        };
                        self.inbox.lock().expect("inbox").appends.push(a);
                    }
                }
                return;
            }
            "session.update" => {
                self.inbox.lock().expect("inbox").session_ready = true;
                let session = ev["session"].clone();
                self.send_to(
                    token,
                    &json!({"type": "session.updated", "event_id": "ev_u", "session": session}),
                );
            }
            "input_audio_buffer.commit" => {
                let item = self.id("item");
                self.send_to(
                    token,
                    &json!({"type": "input_audio_buffer.committed", "event_id": "ev_c", "item_id": item}),
                );
            }
            "input_audio_buffer.clear" => {
                self.send_to(
                    token,
                    &json!({"type": "input_audio_buffer.cleared", "event_id": "ev_l"}),
                );
            }
            "conversation.item.create" if ev["item"]["type"] == "function_call_output" => {
                call_id = ev["item"]["call_id"].as_str().map(str::to_owned);
            }
            "conversation.item.truncate" => {
                let item = ev["item_id"].clone();
                self.send_to(
                    token,
                    &json!({"type": "conversation.item.truncated", "event_id": "ev_t", "item_id": item,
                            "content_index": 0, "audio_end_ms": ev["audio_end_ms"].clone()}),
                );
            }
            "response.cancel" => {
                if self.speak.is_some() {
                    self.finish_speak(true);
                } else {
                    self.send_to(
                        token,
                        &json!({"type": "error", "event_id": "ev_e", "error": {
                            "type": "invalid_request_error", "code": "response_cancel_not_active",
                            "message": "Cancellation failed: no active response found", "param": null, "event_id": null}}),
                    );
                }
            }
            "response.create" => match self.auto {
                AutoReply::Empty => {
                    let id = self.id("resp");
                    self.send_to(
                        token,
                        &json!({"type": "response.created", "event_id": "ev_r", "response": {
                            "id": id, "object": "realtime.response", "status": "in_progress", "output": []}}),
                    );
                    self.send_to(
                        token,
                        &json!({"type": "response.done", "event_id": "ev_d", "response": {
                            "id": id, "object": "realtime.response", "status": "completed", "output": []}}),
                    );
                }
                AutoReply::Speak(ms) if self.speak.is_none() => {
                    let pcm = tone(ms as usize * 24);
                    self.start_speak(pcm, 2400, Duration::from_millis(25), None);
                }
                AutoReply::Speak(_) => {}
            },
            _ => {}
        }
        self.inbox.lock().expect("inbox").events.push(Received {
            t_ns: t,
            kind,
            call_id,
        });
    }

    /// Writes one event to a connection; the instant it was handed to the socket.
    fn send_to(&mut self, token: Token, ev: &Value) -> u64 {
        if let Some(ConnState::Open(ws)) = self.conns.get_mut(&token) {
            let result = ws.send(Message::text(ev.to_string()));
            match result {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.conns.insert(token, ConnState::Closed);
                }
            }
        }
        now_ns()
    }

    fn send_current(&mut self, ev: &Value) -> u64 {
        match self.current {
            Some(t) => self.send_to(t, ev),
            None => now_ns(),
        }
    }

    /// False when the server should stop.
    fn command(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Speak {
                pcm,
                chunk,
                interval,
                reply,
            } => {
                if self.speak.is_some() {
                    self.finish_speak(true);
                }
                self.start_speak(pcm, chunk, interval, reply);
            }
            Cmd::Call {
                name,
                arguments,
                call_id,
                reply,
            } => {
                let response = self.id("resp");
                let item = self.id("item");
                let fc = json!({"type": "function_call", "id": item, "object": "realtime.item",
                    "status": "completed", "call_id": call_id, "name": name, "arguments": arguments});
                self.send_current(&json!({"type": "response.created", "event_id": "ev_r",
                    "response": {"id": response, "object": "realtime.response", "status": "in_progress", "output": []}}));
                self.send_current(
                    &json!({"type": "response.output_item.added", "event_id": "ev_a",
                    "response_id": response, "output_index": 0, "item": fc}),
                );
                let t = self.send_current(&json!({"type": "response.function_call_arguments.done",
                    "event_id": "ev_f", "response_id": response, "item_id": item, "output_index": 0,
                    "call_id": call_id, "name": name, "arguments": arguments}));
                let _ = reply.send(t);
                self.send_current(
                    &json!({"type": "response.output_item.done", "event_id": "ev_o",
                    "response_id": response, "output_index": 0, "item": fc}),
                );
                self.send_current(&json!({"type": "response.done", "event_id": "ev_d",
                    "response": {"id": response, "object": "realtime.response", "status": "completed", "output": [fc]}}));
            }
            Cmd::AutoReply(a) => self.auto = a,
            Cmd::Stop => return false,
        }
        true
    }

    fn start_speak(
        &mut self,
        pcm: Vec<i16>,
        chunk: usize,
        interval: Duration,
        reply: Option<Sender<SpeakReport>>,
    ) {
        let response = self.id("resp");
        let item = self.id("item");
        let msg = json!({"type": "message", "id": item, "object": "realtime.item", "role": "assistant",
            "status": "in_progress", "content": []});
        self.send_current(&json!({"type": "response.created", "event_id": "ev_r",
            "response": {"id": response, "object": "realtime.response", "status": "in_progress", "output": []}}));
        self.send_current(
            &json!({"type": "response.output_item.added", "event_id": "ev_a",
            "response_id": response, "output_index": 0, "item": msg}),
        );
        self.send_current(
            &json!({"type": "response.content_part.added", "event_id": "ev_p",
            "response_id": response, "item_id": item, "output_index": 0, "content_index": 0,
            "part": {"type": "audio", "transcript": ""}}),
        );
        self.speak = Some(Speaking {
            response,
            item,
            pcm,
            pos: 0,
            chunk: chunk.max(1),
            interval_ns: interval.as_nanos() as u64,
            next_ns: now_ns(),
            report: SpeakReport::default(),
            reply,
        });
    }

    fn speak_due(&mut self) {
        loop {
            let Some(s) = self.speak.as_mut() else {
                return;
            };
            if now_ns() < s.next_ns {
                return;
            }
            if s.pos >= s.pcm.len() {
                self.finish_speak(false);
                return;
            }
            let end = (s.pos + s.chunk).min(s.pcm.len());
            let bytes: Vec<u8> = s.pcm[s.pos..end]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let delta = json!({"type": "response.output_audio.delta", "event_id": "ev_x",
                "response_id": s.response, "item_id": s.item, "output_index": 0, "content_index": 0,
                "delta": base64::engine::general_purpose::STANDARD.encode(bytes)});
            s.pos = end;
            s.next_ns += s.interval_ns;
            let total = end as u64;
            let t = self.send_current(&delta);
            if let Some(s) = self.speak.as_mut() {
                s.report.deltas.push((t, total));
            }
        }
    }

    fn finish_speak(&mut self, cancelled: bool) {
        let Some(mut s) = self.speak.take() else {
            return;
        };
        let status = if cancelled { "cancelled" } else { "completed" };
        if !cancelled {
            self.send_current(&json!({"type": "response.output_audio.done", "event_id": "ev_y",
                "response_id": s.response, "item_id": s.item, "output_index": 0, "content_index": 0}));
            self.send_current(
                &json!({"type": "response.content_part.done", "event_id": "ev_z",
                "response_id": s.response, "item_id": s.item, "output_index": 0, "content_index": 0,
                "part": {"type": "audio", "transcript": ""}}),
            );
        }
        let msg = json!({"type": "message", "id": s.item, "object": "realtime.item", "role": "assistant",
            "status": if cancelled { "incomplete" } else { "completed" }, "content": []});
        self.send_current(
            &json!({"type": "response.output_item.done", "event_id": "ev_o",
            "response_id": s.response, "output_index": 0, "item": msg}),
        );
        self.send_current(&json!({"type": "response.done", "event_id": "ev_d",
            "response": {"id": s.response, "object": "realtime.response", "status": status, "output": [msg]}}));
        s.report.cancelled = cancelled;
        if let Some(reply) = s.reply.take() {
            let _ = reply.send(s.report);
        }
    }
}

/// A 440 Hz tone at about -12 dBFS, `samples` long.
pub fn tone(samples: usize) -> Vec<i16> {
    (0..samples)
        .map(|i| {
            let phase = i as f64 * 440.0 * std::f64::consts::TAU / 24_000.0;
            (phase.sin() * 8000.0) as i16
        })
        .collect()
}
