//! A one-shot, blocking check of the Realtime endpoint for `walkie doctor`: connect, TLS,
//! WebSocket upgrade with the key, then the first server event. `session.created` means the
//! key and the model were accepted. Never used by the daemon (it blocks); the daemon's link
//! is [`super::link`].
//!
//! The key goes only into the `Authorization` header and never into a message.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::http::header::AUTHORIZATION;
use tungstenite::{Error as WsError, Message};

use crate::config::Endpoint;

/// Why the endpoint could not be confirmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// DNS, connect, TLS transport or a time-out: the network, not the account; the daemon
    /// would retry. Doctor warns.
    #[error("{0}")]
    Unreachable(String),
    /// The server answered and said no (HTTP 4xx at the upgrade, an `error` event, a bad
    /// certificate): retrying cannot help. Doctor fails.
    #[error("{0}")]
    Refused(String),
}

/// Connects to `url` (with `?model=…` already in it) and waits for `session.created`;
/// returns the model the server named. Everything within `timeout`.
pub fn probe(
    url: &str,
    key: Option<&str>,
    ca_file: &str,
    timeout: Duration,
) -> Result<String, ProbeError> {
    let deadline = Instant::now() + timeout;
    let endpoint = Endpoint::parse(url).map_err(|e| ProbeError::Refused(e.to_string()))?;
    let tcp = connect(&endpoint, deadline)?;
    let mut request = url
        .into_client_request()
        .map_err(|e| ProbeError::Refused(format!("the URL cannot be used: {e}")))?;
    if let Some(key) = key {
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            ProbeError::Refused("the API key holds characters not allowed in a header".into())
        })?;
        value.set_sensitive(true);
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    let stream: Box<dyn ReadWrite> = if endpoint.tls {
        let ca = Some(ca_file)
            .filter(|s| !s.is_empty())
            .map(crate::paths::expand_home);
        let config = super::tls::client_config(ca.as_deref())
            .map_err(|e| ProbeError::Refused(e.to_string()))?;
        let name = super::tls::server_name(&endpoint.host)
            .map_err(|e| ProbeError::Refused(e.to_string()))?;
        let connection = rustls::ClientConnection::new(Arc::clone(&config), name)
            .map_err(|e| ProbeError::Refused(e.to_string()))?;
        Box::new(rustls::StreamOwned::new(connection, tcp))
    } else {
        Box::new(tcp)
    };
    let (mut ws, _response) =
        tungstenite::client::client(request, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => classify(e),
            tungstenite::HandshakeError::Interrupted(_) => {
                ProbeError::Unreachable("the upgrade timed out".into())
            }
        })?;
    loop {
        if Instant::now() >= deadline {
            return Err(ProbeError::Unreachable(
                "no session.created before the time limit".into(),
            ));
        }
        let message = ws.read().map_err(classify)?;
        let Message::Text(text) = message else {
            continue;
        };
        let event: serde_json::Value = serde_json::from_str(text.as_str()).map_err(|_| {
            ProbeError::Refused("the server sent something that is not JSON".into())
        })?;
        let _ = ws.close(None);
        let _ = ws.flush();
        return match event["type"].as_str() {
            Some("session.created") => Ok(event["session"]["model"]
                .as_str()
                .unwrap_or("the configured model")
                .to_string()),
            Some("error") => Err(ProbeError::Refused(describe_error(&event["error"]))),
            other => Err(ProbeError::Refused(format!(
                "the first event was {} instead of session.created",
                other.unwrap_or("untyped")
            ))),
        };
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Resolves and connects within the deadline; every socket operation after it is bounded
/// by read and write time-outs.
fn connect(endpoint: &Endpoint, deadline: Instant) -> Result<TcpStream, ProbeError> {
    let addrs: Vec<_> = (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()
        .map_err(|e| ProbeError::Unreachable(format!("cannot resolve {}: {e}", endpoint.host)))?
        .collect();
    let mut last = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(tcp) => {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100));
                let _ = tcp.set_read_timeout(Some(left));
                let _ = tcp.set_write_timeout(Some(left));
                return Ok(tcp);
            }
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    Err(ProbeError::Unreachable(
        last.unwrap_or_else(|| "no address to connect to".into()),
    ))
}

fn classify(e: WsError) -> ProbeError {
    match e {
        WsError::Http(response) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok());
            let what = body
                .as_ref()
                .map(|b| describe_error(&b["error"]))
                .unwrap_or_default();
            let text = if what.is_empty() {
                format!("HTTP {status} at the upgrade")
            } else {
                format!("HTTP {status} at the upgrade: {what}")
            };
            if status >= 500 {
                ProbeError::Unreachable(text)
            } else {
                ProbeError::Refused(text)
            }
        }
        WsError::Tls(e) => ProbeError::Refused(format!("TLS: {e}")),
        WsError::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
            ProbeError::Refused(format!("TLS: {e}"))
        }
        WsError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            ProbeError::Unreachable("the server did not answer in time".into())
        }
        WsError::Io(e) => ProbeError::Unreachable(e.to_string()),
        other => ProbeError::Unreachable(other.to_string()),
    }
}

/// `code: message` of an OpenAI error object (never the key: the server does not echo it).
fn describe_error(error: &serde_json::Value) -> String {
    let code = error["code"].as_str().or(error["type"].as_str());
    let message = error["message"].as_str();
    match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_string(),
        (None, Some(message)) => message.to_string(),
        (None, None) => String::new(),
    }
}
