//! A tap on the wire between walkie and fake-realtime: a TCP relay that timestamps every
//! `input_audio_buffer.append` frame walkie sends as it arrives, for mic→wire latency. It
//! reads the client's WebSocket frames (RFC 6455 §5.2: masked, maybe fragmented) and
//! forwards every byte unchanged.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;
use serde_json::Value;

type Appends = Arc<Mutex<Vec<(Instant, Vec<i16>)>>>;

pub struct WireTap {
    /// `ws://127.0.0.1:PORT/v1/realtime`: give walkie this instead of the server's URL.
    pub url: String,
    appends: Appends,
}

impl WireTap {
    /// Relays connections to `upstream` (`ws://HOST:PORT/...`).
    pub fn start(upstream: &str) -> WireTap {
        let rest = upstream.strip_prefix("ws://").expect("a ws:// URL");
        let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
        let addr = addr.to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/{path}", listener.local_addr().unwrap());
        let appends: Appends = Arc::default();
        let sink = Arc::clone(&appends);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&addr) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut from_server, mut to_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(Shutdown::Both);
                });
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || relay_client(client, server, &sink));
            }
        });
        WireTap { url, appends }
    }

    /// Every append so far: when it arrived, and its audio.
    pub fn appends(&self) -> Vec<(Instant, Vec<i16>)> {
        self.appends.lock().unwrap().clone()
    }
}

fn relay_client(mut client: TcpStream, mut server: TcpStream, sink: &Appends) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut upgraded = false;
    let mut message: Vec<u8> = Vec::new();
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let at = Instant::now();
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        if !upgraded {
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            pending.drain(..end + 4);
            upgraded = true;
        }
        while let Some((fin, opcode, payload, used)) = frame(&pending) {
            pending.drain(..used);
            if opcode == 1 || opcode == 0 {
                message.extend_from_slice(&payload);
                if fin {
                    if let Some(audio) = append_audio(&message) {
                        sink.lock().unwrap().push((at, audio));
                    }
                    message.clear();
                }
            }
        }
    }
    let _ = server.shutdown(Shutdown::Both);
}

/// One whole frame at the start of `bytes`: (FIN, opcode, unmasked payload, bytes used).
fn frame(bytes: &[u8]) -> Option<(bool, u8, Vec<u8>, usize)> {
    let (b0, b1) = (*bytes.first()?, *bytes.get(1)?);
    let mut at = 2;
    let mut len = u64::from(b1 & 0x7f);
    if len == 126 {
        len = u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?));
        at = 4;
    } else if len == 127 {
        len = u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?);
        at = 10;
    }
    let mask: Option<[u8; 4]> = if b1 & 0x80 != 0 {
        let m = bytes.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let end = at + usize::try_from(len).ok()?;
    let mut payload = bytes.get(at..end)?.to_vec();
    if let Some(mask) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Some((b0 & 0x80 != 0, b0 & 0x0f, payload, end))
}

fn append_audio(message: &[u8]) -> Option<Vec<i16>> {
    let event: Value = serde_json::from_slice(message).ok()?;
    if event["type"] != "input_audio_buffer.append" {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(event["audio"].as_str()?)
        .ok()?;
    Some(
        bytes
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect(),
    )
}
