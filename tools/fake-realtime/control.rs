//! The control port: tests make the server misbehave and ask it what it saw.
//!
//! A TCP listener on its own thread, one thread per client; each line is one JSON command,
//! answered by one JSON line (`{"ok":true,...}` or `{"ok":false,"error":"..."}`). Commands
//! for a connection go through that connection's channel and are acknowledged by its thread,
//! so when the answer arrives the effect has happened (the frame is written, the socket
//! reset).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use serde_json::{Value, json};

use crate::script::Script;
use crate::server::{Command, Reject, Shared, lock, refusal_body};

/// How long a connection thread may take to acknowledge (it polls every 20 ms).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        match client {
            Ok(client) => {
                let shared = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name("fake-realtime-control".to_owned())
                    .spawn(move || serve(&shared, client));
                if let Err(e) = spawned {
                    log::error!("cannot start a control thread: {e}");
                }
            }
            Err(e) => {
                log::warn!("control accept failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn serve(shared: &Shared, client: TcpStream) {
    let reader = match client.try_clone() {
        Ok(reader) => BufReader::new(reader),
        Err(e) => {
            log::warn!("control: {e}");
            return;
        }
    };
    let mut writer = client;
    for line in reader.lines() {
        let Ok(line) = line else {
            return;
        };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(command) => execute(shared, &command),
            Err(e) => fail(&format!("not JSON: {e}")),
        };
        let mut text = reply.to_string();
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

fn fail(message: &str) -> Value {
    json!({"ok": false, "error": message})
}

/// Runs one control command and returns its answer.
pub fn execute(shared: &Shared, command: &Value) -> Value {
    let Some(name) = command.get("cmd").and_then(Value::as_str) else {
        return fail("missing \"cmd\"");
    };
    match name {
        "drop" => forward(shared, Command::Drop),
        "silence" => forward(shared, Command::Silence),
        "expire" => forward(shared, Command::Expire),
        "unknown" => forward(shared, Command::Unknown),
        "malformed" => forward(shared, Command::Malformed),
        "send" => match command.get("event") {
            Some(event) => forward(shared, Command::Send(event.clone())),
            None => fail("send needs \"event\""),
        },
        "close" => {
            let code = command.get("code").map_or(Some(1000), Value::as_u64);
            match code.and_then(|c| u16::try_from(c).ok()) {
                // These codes only report a state locally; RFC 6455 forbids sending them.
                Some(1005 | 1006 | 1015) => fail("codes 1005, 1006 and 1015 cannot be sent"),
                Some(code @ 1000..=4999) => forward(shared, Command::Close(code)),
                _ => fail("close needs a \"code\" between 1000 and 4999"),
            }
        }
        "reject_upgrades" => {
            let status = command.get("status").map_or(Some(401), Value::as_u64);
            let count = command.get("count").map_or(Some(1), Value::as_u64);
            match (
                status.and_then(|s| u16::try_from(s).ok()),
                count.and_then(|c| u32::try_from(c).ok()),
            ) {
                (Some(status @ 400..=599), Some(count)) => {
                    // The body: a string as is, any other JSON value serialised; by default
                    // the real API's body for that status.
                    let body = match command.get("body") {
                        None => refusal_body(status).to_string(),
                        Some(Value::String(text)) => text.clone(),
                        Some(other) => other.to_string(),
                    };
                    let split_ms = command.get("split_ms").and_then(Value::as_u64).unwrap_or(0);
                    let chunked = command
                        .get("chunked")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    *lock(&shared.reject) = (count > 0).then_some(Reject {
                        status,
                        remaining: count,
                        body,
                        split: Duration::from_millis(split_ms),
                        chunked,
                    });
                    json!({"ok": true})
                }
                _ => fail("reject_upgrades needs \"status\" 400..599 and a \"count\""),
            }
        }
        "script" => {
            let mut document = command.clone();
            if let Some(map) = document.as_object_mut() {
                map.remove("cmd");
            }
            match Script::from_json(&document, Path::new(".")) {
                Ok(script) => {
                    *lock(&shared.script) = Arc::new(script);
                    json!({"ok": true})
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        "state" => state(shared),
        other => fail(&format!("unknown command {other:?}")),
    }
}

fn state(shared: &Shared) -> Value {
    let registry = lock(&shared.registry);
    let pending = lock(&shared.reject).as_ref().map_or(0, |r| r.remaining);
    let mut reply = json!({
        "ok": true,
        "connections": registry.total,
        "open_connections": registry.live.len(),
        "events_received_total": shared.events_total.load(Ordering::Relaxed),
        "rejected_upgrades": registry.rejected_upgrades,
        "rejects_pending": pending,
        "current": null,
        "open": false,
        "active_response": null,
        "events_received": 0,
        "turn_detection_null": null,
        "truncations": [],
        "silenced": false,
        "model": null,
    });
    if let Some((id, status)) = &registry.latest {
        let status = lock(status);
        reply["current"] = json!(id);
        reply["open"] = json!(registry.live.contains_key(id));
        reply["active_response"] = json!(status.active_response);
        reply["events_received"] = json!(status.events_received);
        reply["turn_detection_null"] = json!(status.turn_detection_null);
        reply["truncations"] = json!(status.truncations);
        reply["silenced"] = json!(status.silenced);
        reply["model"] = json!(status.model);
    }
    reply
}

/// Hands a command to the current connection and waits for it to be carried out.
fn forward(shared: &Shared, command: Command) -> Value {
    let Some((id, handle)) = lock(&shared.registry).current() else {
        return fail("no open connection");
    };
    let (ack, done) = mpsc::channel();
    if handle.commands.send((command, ack)).is_err() {
        return fail("the connection has just closed");
    }
    match done.recv_timeout(ACK_TIMEOUT) {
        Ok(Ok(())) => json!({"ok": true, "conn": id}),
        Ok(Err(e)) => fail(&e),
        Err(_) => fail("the connection did not answer"),
    }
}
