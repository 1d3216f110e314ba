//! Tests of the `fake-realtime` tool itself: the binary is started for each test and driven
//! with a blocking tungstenite client (plain and TLS) and its control port, the way walkie's
//! integration tests will use it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::client::ClientRequestBuilder;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

mod common;

const BIN: &str = common::FAKE_REALTIME;
/// Generous: builders share two cores; nothing here waits this long when it works.
const WAIT: Duration = Duration::from_secs(20);

struct Fake {
    child: Child,
    port: u16,
    control_port: u16,
    url: String,
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port_of(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {address:?}"))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Fake {
    fn start(args: &[&str]) -> Fake {
        common::fakes_built();
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fake-realtime");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut control_port = None;
        let url = loop {
            let mut line = String::new();
            let read = stdout.read_line(&mut line).expect("read stdout");
            assert!(read > 0, "fake-realtime exited before it was ready");
            let line = line.trim();
            if let Some(address) = line.strip_prefix("control ") {
                control_port = Some(port_of(address));
            }
            if let Some(url) = line.strip_prefix("listening ") {
                break url.to_owned();
            }
        };
        Fake {
            child,
            port: port_of(&url),
            control_port: control_port.expect("a control line before the listening line"),
            url,
            _stdout: stdout,
        }
    }

    fn try_connect(
        &self,
        headers: &[(&str, &str)],
    ) -> Result<WebSocket<TcpStream>, tungstenite::Error> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).expect("tcp connect");
        tcp.set_read_timeout(Some(WAIT)).expect("timeout");
        let uri = format!("{}/v1/realtime?model=gpt-realtime", self.url);
        let mut request = ClientRequestBuilder::new(uri.parse().expect("uri"));
        for (name, value) in headers {
            request = request.with_header(*name, *value);
        }
        match tungstenite::client(request, tcp) {
            Ok((ws, _)) => Ok(ws),
            Err(HandshakeError::Failure(e)) => Err(e),
            Err(HandshakeError::Interrupted(_)) => panic!("handshake timed out"),
        }
    }

    /// Connects and returns the socket with the `session.created` event.
    fn connect(&self) -> (WebSocket<TcpStream>, Value) {
        let mut ws = self.try_connect(&[]).expect("upgrade");
        let created = recv(&mut ws);
        assert_eq!(created["type"], "session.created", "{created}");
        (ws, created)
    }

    fn control(&self, command: Value) -> Value {
        let mut tcp = TcpStream::connect(("127.0.0.1", self.control_port)).expect("control");
        tcp.set_read_timeout(Some(WAIT)).expect("timeout");
        writeln!(tcp, "{command}").expect("send command");
        let mut line = String::new();
        BufReader::new(tcp).read_line(&mut line).expect("answer");
        serde_json::from_str(&line).expect("JSON answer")
    }
}

fn send<S: std::io::Read + Write>(ws: &mut WebSocket<S>, event: Value) {
    ws.send(Message::text(event.to_string())).expect("send");
}

/// The next text frame, parsed (non-JSON text comes back as `{"raw": text}`).
fn recv<S: std::io::Read + Write>(ws: &mut WebSocket<S>) -> Value {
    loop {
        match ws.read().expect("a frame before the timeout") {
            Message::Text(text) => {
                return serde_json::from_str(text.as_str())
                    .unwrap_or_else(|_| json!({"raw": text.as_str()}));
            }
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

/// Every event up to and including the first of `event_type`.
fn recv_until<S: std::io::Read + Write>(ws: &mut WebSocket<S>, event_type: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = recv(ws);
        let done = event["type"] == event_type;
        events.push(event);
        if done {
            return events;
        }
    }
}

fn expect_close<S: std::io::Read + Write>(ws: &mut WebSocket<S>) -> u16 {
    loop {
        match ws.read().expect("a close frame") {
            Message::Close(Some(frame)) => return frame.code.into(),
            Message::Close(None) => panic!("close without a code"),
            _ => {}
        }
    }
}

fn user_text(text: &str) -> Value {
    json!({"type":"conversation.item.create","item":{"type":"message","role":"user",
        "content":[{"type":"input_text","text":text}]}})
}

fn write_script(dir: &Path, script: Value) -> String {
    let path = dir.join("script.json");
    std::fs::write(&path, script.to_string()).expect("write script");
    path.display().to_string()
}

#[test]
fn session_created_then_strict_session_update() {
    let fake = Fake::start(&[]);
    let (mut ws, created) = fake.connect();
    let session = &created["session"];
    assert_eq!(session["type"], "realtime");
    assert_eq!(session["model"], "gpt-realtime");
    assert_eq!(
        session["audio"]["input"]["turn_detection"]["type"],
        "server_vad"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expires_at = session["expires_at"].as_u64().expect("expires_at");
    assert!(
        expires_at > now + 3500 && expires_at <= now + 3600,
        "{expires_at} vs {now}"
    );

    send(
        &mut ws,
        json!({"type":"session.update","event_id":"evt_beta",
               "session":{"type":"realtime","modalities":["audio","text"],"voice":"marin"}}),
    );
    let error = recv(&mut ws);
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "unknown_parameter");
    assert_eq!(error["error"]["param"], "session.modalities");
    assert_eq!(error["error"]["event_id"], "evt_beta");

    send(&mut ws, json!({"type":"session.heartbeat"}));
    assert_eq!(recv(&mut ws)["error"]["code"], "unknown_event");

    send(
        &mut ws,
        json!({"type":"session.update","session":{"type":"realtime","output_modalities":["audio"],
            "audio":{"input":{"turn_detection":null,"transcription":{"model":"gpt-4o-mini-transcribe"}},
                     "output":{"voice":"cedar"}}}}),
    );
    let updated = recv(&mut ws);
    assert_eq!(updated["type"], "session.updated", "{updated}");
    assert!(updated["session"]["audio"]["input"]["turn_detection"].is_null());
    assert_eq!(updated["session"]["audio"]["output"]["voice"], "cedar");

    let state = fake.control(json!({"cmd":"state"}));
    assert_eq!(state["turn_detection_null"], true);
    assert_eq!(state["events_received"], 3);
    assert_eq!(state["open"], true);
}

#[test]
fn only_one_response_may_be_active() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A minute of audio at real time: the response is still active whatever the load.
    let script = write_script(
        dir.path(),
        json!({"default":{"say":"a long story","audio_ms":60000}}),
    );
    let fake = Fake::start(&["--script", &script, "--speed", "1"]);
    let (mut ws, _) = fake.connect();
    send(&mut ws, user_text("tell me a story"));
    recv_until(&mut ws, "conversation.item.done");
    send(&mut ws, json!({"type":"response.create"}));
    let created = recv(&mut ws);
    assert_eq!(created["type"], "response.created");
    let response_id = created["response"]["id"].as_str().expect("id").to_owned();

    let audio = recv_until(&mut ws, "response.output_audio.delta");
    let delta = audio.last().expect("delta")["delta"]
        .as_str()
        .expect("b64")
        .to_owned();
    let pcm = base64::engine::general_purpose::STANDARD
        .decode(delta)
        .expect("valid base64");
    assert_eq!(pcm.len(), 4800, "100 ms of s16le at 24 kHz per delta");

    send(
        &mut ws,
        json!({"type":"response.create","event_id":"evt_second"}),
    );
    let error = recv_until(&mut ws, "error").pop().expect("error");
    assert_eq!(
        error["error"]["code"],
        "conversation_already_has_active_response"
    );
    assert_eq!(error["error"]["event_id"], "evt_second");
    let state = fake.control(json!({"cmd":"state"}));
    assert_eq!(state["active_response"], response_id.as_str());

    send(&mut ws, json!({"type":"response.cancel"}));
    let done = recv_until(&mut ws, "response.done").pop().expect("done");
    assert_eq!(done["response"]["status"], "cancelled");
    send(&mut ws, json!({"type":"response.create"}));
    assert_eq!(
        recv(&mut ws)["type"],
        "response.created",
        "free again after done"
    );
}

#[test]
fn commit_needs_100_ms_of_audio() {
    let fake = Fake::start(&[]);
    let (mut ws, _) = fake.connect();
    send(
        &mut ws,
        json!({"type":"input_audio_buffer.append","audio":b64(&[0; 2400])}),
    );
    send(
        &mut ws,
        json!({"type":"input_audio_buffer.commit","event_id":"evt_c1"}),
    );
    let error = recv(&mut ws);
    assert_eq!(error["error"]["code"], "input_audio_buffer_commit_empty");
    assert_eq!(error["error"]["event_id"], "evt_c1");

    send(
        &mut ws,
        json!({"type":"input_audio_buffer.append","audio":b64(&[0; 2400])}),
    );
    send(&mut ws, json!({"type":"input_audio_buffer.commit"}));
    let committed = recv(&mut ws);
    assert_eq!(committed["type"], "input_audio_buffer.committed");
    let added = recv(&mut ws);
    assert_eq!(added["type"], "conversation.item.added");
    assert_eq!(added["item"]["id"], committed["item_id"]);

    send(&mut ws, json!({"type":"input_audio_buffer.clear"}));
    assert_eq!(recv_until(&mut ws, "input_audio_buffer.cleared").len(), 2);
}

#[test]
fn a_scripted_function_call_then_its_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = write_script(
        dir.path(),
        json!({"rules":[{"match":"(?i)deploy","reply":{"call":{"name":"start_task",
                  "arguments":{"prompt":"{text}","name":"deploy"}}}}],
               "after_tool":{"say":"Deploying now.","audio_ms":200}}),
    );
    let fake = Fake::start(&["--script", &script]);
    let (mut ws, _) = fake.connect();

    send(
        &mut ws,
        json!({"type":"conversation.item.create","item":{"type":"function_call_output",
               "call_id":"call_from_another_session","output":"{}"}}),
    );
    assert_eq!(recv(&mut ws)["error"]["code"], "invalid_tool_call_id");

    send(&mut ws, user_text("deploy the site"));
    send(&mut ws, json!({"type":"response.create"}));
    let events = recv_until(&mut ws, "response.done");
    let call = events
        .iter()
        .find(|e| e["type"] == "response.function_call_arguments.done")
        .expect("a function call");
    assert_eq!(call["name"], "start_task");
    let arguments: Value =
        serde_json::from_str(call["arguments"].as_str().expect("string")).expect("JSON");
    assert_eq!(
        arguments,
        json!({"prompt":"deploy the site","name":"deploy"})
    );
    let done = events.last().expect("done");
    assert_eq!(done["response"]["output"][0]["type"], "function_call");
    assert_eq!(done["response"]["output"][0]["call_id"], call["call_id"]);

    send(
        &mut ws,
        json!({"type":"conversation.item.create","item":{"type":"function_call_output",
               "call_id":call["call_id"],"output":"{\"status\":\"started\",\"task\":\"deploy\"}"}}),
    );
    assert_eq!(recv(&mut ws)["type"], "conversation.item.added");
    send(&mut ws, json!({"type":"response.create"}));
    let events = recv_until(&mut ws, "response.done");
    let transcript = events
        .iter()
        .find(|e| e["type"] == "response.output_audio_transcript.done")
        .expect("spoken");
    assert_eq!(transcript["transcript"], "Deploying now.");
}

#[test]
fn cancel_stops_the_response_and_truncate_is_bounded_by_audio_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = write_script(
        dir.path(),
        json!({"default":{"say":"long","audio_ms":60000}}),
    );
    let fake = Fake::start(&["--script", &script, "--speed", "1"]);
    let (mut ws, _) = fake.connect();
    send(&mut ws, json!({"type":"response.cancel"}));
    assert_eq!(recv(&mut ws)["error"]["code"], "response_cancel_not_active");

    send(&mut ws, user_text("talk"));
    send(&mut ws, json!({"type":"response.create"}));
    let mut events = recv_until(&mut ws, "response.output_audio.delta");
    let item_id = events.last().expect("delta")["item_id"].clone();
    send(&mut ws, json!({"type":"response.cancel"}));
    events.extend(recv_until(&mut ws, "response.done"));
    let done = events.last().expect("done");
    assert_eq!(done["response"]["status"], "cancelled");
    assert_eq!(done["response"]["output"][0]["status"], "incomplete");
    let chunks = events
        .iter()
        .filter(|e| e["type"] == "response.output_audio.delta")
        .count() as u64;
    assert!(chunks < 600, "the minute of audio was cut short");

    let truncate = |ms: u64| {
        json!({"type":"conversation.item.truncate","item_id":item_id,"content_index":0,
               "audio_end_ms":ms})
    };
    send(&mut ws, truncate(chunks * 100 + 100));
    let error = recv(&mut ws);
    assert_eq!(error["error"]["code"], "invalid_value", "{error}");
    assert_eq!(error["error"]["param"], "audio_end_ms");
    send(&mut ws, truncate(50));
    let truncated = recv(&mut ws);
    assert_eq!(truncated["type"], "conversation.item.truncated");
    assert_eq!(truncated["audio_end_ms"], 50);
    let state = fake.control(json!({"cmd":"state"}));
    assert_eq!(state["truncations"][0]["audio_end_ms"], 50);
    assert_eq!(state["active_response"], Value::Null);
}

#[test]
fn drop_cuts_the_connection_and_the_next_one_is_accepted() {
    let fake = Fake::start(&[]);
    let (mut first, _) = fake.connect();
    assert_eq!(fake.control(json!({"cmd":"drop"}))["ok"], true);
    let after_drop = loop {
        match first.read() {
            Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_)) => continue,
            other => break other,
        }
    };
    match after_drop {
        Err(tungstenite::Error::Io(_))
        | Err(tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        )) => {}
        other => panic!("expected an abrupt end without a close frame, got {other:?}"),
    }
    let (_second, _) = fake.connect();
    let state = fake.control(json!({"cmd":"state"}));
    assert_eq!(state["connections"], 2);
    assert_eq!(state["current"], 2);
}

#[test]
fn expire_on_command_and_at_expires_at() {
    let fake = Fake::start(&[]);
    let (mut ws, _) = fake.connect();
    assert_eq!(fake.control(json!({"cmd":"expire"}))["ok"], true);
    assert_eq!(recv(&mut ws)["error"]["code"], "session_expired");
    assert_eq!(expect_close(&mut ws), 1001);

    let short = Fake::start(&["--session-seconds", "1"]);
    let (mut ws, created) = short.connect();
    assert!(created["session"]["expires_at"].as_u64().is_some());
    assert_eq!(recv(&mut ws)["error"]["code"], "session_expired");
    assert_eq!(expect_close(&mut ws), 1001);
}

#[test]
fn reject_upgrades_answers_with_the_status_and_an_openai_body() {
    let fake = Fake::start(&[]);
    let answer = fake.control(json!({"cmd":"reject_upgrades","status":401,"count":1}));
    assert_eq!(answer["ok"], true);
    match fake.try_connect(&[]) {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .expect("JSON body");
            assert_eq!(body["error"]["code"], "invalid_api_key");
        }
        Err(e) => panic!("expected HTTP 401, got {e}"),
        Ok(_) => panic!("expected HTTP 401, got an upgrade"),
    }
    let (_ws, _) = fake.connect();
    let state = fake.control(json!({"cmd":"state"}));
    assert_eq!(state["rejected_upgrades"], 1);
    assert_eq!(state["connections"], 1);
}

#[test]
fn reject_upgrades_can_send_any_body_late_or_chunked() {
    let fake = Fake::start(&[]);
    let raw = |port: u16| {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(
            b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .unwrap();
        let start = Instant::now();
        let mut chunks = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => chunks.push((start.elapsed(), buf[..n].to_vec())),
            }
        }
        chunks
    };
    fake.control(json!({"cmd":"reject_upgrades","status":429,"count":1,
                        "body":{"error":{"code":"custom"}},"split_ms":300}));
    let chunks = raw(fake.port);
    let all: Vec<u8> = chunks.iter().flat_map(|(_, c)| c.clone()).collect();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
        "{text}"
    );
    assert!(
        text.ends_with("\r\n\r\n{\"error\":{\"code\":\"custom\"}}"),
        "{text}"
    );
    // The body came after the pause, apart from the head.
    let (late, body) = chunks.last().unwrap();
    assert!(*late >= Duration::from_millis(250), "{late:?}");
    assert!(
        body.starts_with(b"{"),
        "{:?}",
        String::from_utf8_lossy(body)
    );

    fake.control(
        json!({"cmd":"reject_upgrades","status":503,"count":1,"body":"down","chunked":true}),
    );
    let all: Vec<u8> = raw(fake.port).into_iter().flat_map(|(_, c)| c).collect();
    let text = String::from_utf8_lossy(&all);
    assert!(text.contains("Transfer-Encoding: chunked\r\n"), "{text}");
    assert!(
        text.ends_with("\r\n\r\n2\r\ndo\r\n2\r\nwn\r\n0\r\n\r\n"),
        "{text}"
    );
    assert_eq!(fake.control(json!({"cmd":"state"}))["rejected_upgrades"], 2);
}

#[test]
fn api_key_is_required_and_the_beta_header_is_refused() {
    let fake = Fake::start(&["--api-key", "sk-test-key"]);
    for headers in [&[][..], &[("Authorization", "Bearer wrong")][..]] {
        match fake.try_connect(headers) {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
            Err(e) => panic!("expected HTTP 401, got {e}"),
            Ok(_) => panic!("expected HTTP 401, got an upgrade"),
        }
    }
    let mut ws = fake
        .try_connect(&[("Authorization", "Bearer sk-test-key")])
        .expect("upgrade with the key");
    assert_eq!(recv(&mut ws)["type"], "session.created");

    let mut beta = fake
        .try_connect(&[
            ("Authorization", "Bearer sk-test-key"),
            ("OpenAI-Beta", "realtime=v1"),
        ])
        .expect("beta clients are upgraded first");
    let error = recv(&mut beta);
    assert_eq!(error["error"]["code"], "beta_api_shape_disabled");
    assert_eq!(expect_close(&mut beta), 4000);
}

#[test]
fn the_record_file_holds_every_client_event_in_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("record.jsonl");
    let fake = Fake::start(&["--record", record.to_str().expect("utf8")]);
    let (mut ws, _) = fake.connect();
    let audio = b64(&(0..4800u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let update = json!({"type":"session.update","session":{"type":"realtime"}});
    let append = json!({"type":"input_audio_buffer.append","audio":audio});
    send(&mut ws, update.clone());
    send(&mut ws, append.clone());
    ws.send(Message::text("not json")).expect("send");
    recv_until(&mut ws, "error");
    ws.close(None).expect("close");
    while ws.read().is_ok() {}

    let deadline = Instant::now() + WAIT;
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        if lines.last().is_some_and(|l| l["meta"] == "closed") {
            break lines;
        }
        assert!(Instant::now() < deadline, "no closed line in {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert_eq!(lines[0]["meta"], "open");
    assert_eq!(lines[1]["event"], update);
    assert_eq!(lines[2]["event"], append, "audio is recorded in full");
    assert_eq!(lines[3]["raw"], "not json");
    assert!(lines.iter().all(|l| l["conn"] == 1));
    let times: Vec<u64> = lines
        .iter()
        .map(|l| l["t_ms"].as_u64().expect("t_ms"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

#[test]
fn tls_with_the_generated_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    let fake = Fake::start(&["--tls", "--cert-out", ca.to_str().expect("utf8")]);
    assert!(fake.url.starts_with("wss://localhost:"), "{}", fake.url);
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let connect = |roots: rustls::RootCertStore| {
        let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let tls = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let tcp = TcpStream::connect(("127.0.0.1", fake.port)).expect("tcp");
        tcp.set_read_timeout(Some(WAIT)).expect("timeout");
        let stream = rustls::StreamOwned::new(tls, tcp);
        // Only whether the upgrade worked matters here, not why it failed.
        tungstenite::client(format!("{}/v1/realtime", fake.url), stream)
            .ok()
            .map(|(ws, _)| ws)
    };

    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(&ca).expect("PEM"))
        .expect("CA");
    let mut ws = connect(roots).expect("TLS upgrade with the CA");
    assert_eq!(recv(&mut ws)["type"], "session.created");

    let untrusted = connect(rustls::RootCertStore::empty());
    assert!(
        untrusted.is_none(),
        "without the CA the certificate must not verify"
    );
}

#[test]
fn silence_keeps_the_socket_open_and_new_connections_are_accepted() {
    let fake = Fake::start(&[]);
    let (mut first, _) = fake.connect();
    assert_eq!(fake.control(json!({"cmd":"silence"}))["ok"], true);
    assert_eq!(fake.control(json!({"cmd":"state"}))["silenced"], true);
    send(&mut first, user_text("hello?"));
    let (_second, _) = fake.connect();
    let state = fake.control(json!({"cmd":"state"}));
    assert_eq!(state["connections"], 2);
    assert_eq!(state["open_connections"], 2, "the silent one is still open");
    // The silent socket neither answered the event nor closed.
    first
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    match first.read() {
        Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("expected silence, got {other:?}"),
    }
}

#[test]
fn control_misbehaviour_and_runtime_scripts() {
    let fake = Fake::start(&[]);
    let (mut ws, _) = fake.connect();

    assert_eq!(fake.control(json!({"cmd":"unknown"}))["ok"], true);
    let known = [
        "session.created",
        "error",
        "response.created",
        "response.done",
        "response.output_audio.delta",
    ];
    for _ in 0..3 {
        let event = recv(&mut ws);
        let event_type = event["type"].as_str().expect("typed");
        assert!(!known.contains(&event_type), "{event_type} is a known type");
    }

    assert_eq!(fake.control(json!({"cmd":"malformed"}))["ok"], true);
    let malformed: Vec<Value> = (0..4).map(|_| recv(&mut ws)).collect();
    assert!(
        malformed[0]["raw"].is_string(),
        "not JSON: {}",
        malformed[0]
    );
    assert!(malformed[1].is_array());
    assert!(malformed[2].get("type").is_none());
    assert_eq!(malformed[3]["type"], "response.output_audio.delta");
    let bad = malformed[3]["delta"].as_str().expect("string");
    assert!(
        base64::engine::general_purpose::STANDARD
            .decode(bad)
            .is_err()
    );

    let custom =
        json!({"type":"rate_limits.updated","rate_limits":[{"name":"requests","limit":5}]});
    assert_eq!(
        fake.control(json!({"cmd":"send","event":custom}))["ok"],
        true
    );
    assert_eq!(recv(&mut ws), custom, "sent verbatim");

    let answer = fake.control(json!({"cmd":"script",
        "rules":[{"match":"ping","reply":{"say":"pong","audio_ms":100}}]}));
    assert_eq!(answer["ok"], true, "{answer}");
    send(&mut ws, user_text("ping"));
    send(&mut ws, json!({"type":"response.create"}));
    let events = recv_until(&mut ws, "response.done");
    let transcript = events
        .iter()
        .find(|e| e["type"] == "response.output_audio_transcript.done")
        .expect("spoken");
    assert_eq!(transcript["transcript"], "pong");
    let refused = fake.control(json!({"cmd":"script","rules":[{"match":"(","reply":{}}]}));
    assert_eq!(refused["ok"], false);

    assert_eq!(fake.control(json!({"cmd":"close","code":1011}))["ok"], true);
    assert_eq!(expect_close(&mut ws), u16::from(CloseCode::Error));
    assert_eq!(fake.control(json!({"cmd":"bogus"}))["ok"], false);
}
