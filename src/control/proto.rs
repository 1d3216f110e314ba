//! The control protocol: one JSON request per line, one JSON reply per line
//! (`{"ok":true,...}` or `{"ok":false,"error":"..."}`); streaming commands (`logs` with
//! `follow`, `events`) send several reply lines and end with `{"ok":true,"end":true,...}`.

use serde::{Deserialize, Serialize};

/// A request. `cmd` names the variant; unknown commands and fields are refused with a
/// message naming them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Tasks,
    Start {
        prompt: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        project: Option<String>,
    },
    Continue {
        name: String,
        prompt: String,
    },
    Cancel {
        name: String,
    },
    /// Ends the agent's current turn; its process and session stay.
    Interrupt {
        name: String,
    },
    /// Allows the permission request the task's agent waits on (`always`: and what the
    /// agent suggested for next time).
    Approve {
        name: String,
        #[serde(default)]
        always: bool,
    },
    /// Denies it; the agent sees the reason.
    Deny {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Result {
        name: String,
    },
    Logs {
        name: String,
        #[serde(default)]
        follow: bool,
    },
    Say {
        text: String,
    },
    Press,
    Release,
    /// Streams task events (started, finished) until the client disconnects.
    Events,
    Transcript,
}

/// Parses one request line; the error is the message sent back to the client.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("request is not JSON: {e}"))?;
    if !value.is_object() {
        return Err("request must be a JSON object with a \"cmd\" field".into());
    }
    match value.get("cmd") {
        None => return Err("request has no \"cmd\" field".into()),
        Some(serde_json::Value::String(_)) => {}
        Some(_) => return Err("\"cmd\" must be a string".into()),
    }
    // serde's deny_unknown_fields does not reach the fields of unit variants of an
    // internally tagged enum, so the allowed fields are checked here for every command.
    let request: Request =
        serde_json::from_value(value.clone()).map_err(|e| format!("bad request: {e}"))?;
    let allowed: &[&str] = match request {
        Request::Start { .. } => &["prompt", "name", "project"],
        Request::Continue { .. } => &["name", "prompt"],
        Request::Cancel { .. } | Request::Result { .. } | Request::Interrupt { .. } => &["name"],
        Request::Approve { .. } => &["name", "always"],
        Request::Deny { .. } => &["name", "reason"],
        Request::Logs { .. } => &["name", "follow"],
        Request::Say { .. } => &["text"],
        _ => &[],
    };
    if let Some(extra) = value
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .find(|k| *k != "cmd" && !allowed.contains(&k.as_str()))
    {
        return Err(format!(
            "bad request: unknown field `{extra}` for this command"
        ));
    }
    Ok(request)
}

/// `{"ok":false,"error":msg}`
pub fn error_reply(msg: impl Into<String>) -> serde_json::Value {
    serde_json::json!({"ok": false, "error": msg.into()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_explains_bad_ones() {
        assert_eq!(parse_request(br#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(br#"{"cmd":"start","prompt":"fix it","name":"fix"}"#),
            Ok(Request::Start {
                prompt: "fix it".into(),
                name: Some("fix".into()),
                project: None
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"approve","name":"x"}"#),
            Ok(Request::Approve {
                name: "x".into(),
                always: false
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"deny","name":"x","reason":"not now"}"#),
            Ok(Request::Deny {
                name: "x".into(),
                reason: Some("not now".into())
            })
        );
        assert!(
            parse_request(br#"{"cmd":"interrupt","name":"x","now":true}"#)
                .unwrap_err()
                .contains("now")
        );
        assert_eq!(
            parse_request(br#"{"cmd":"logs","name":"x"}"#),
            Ok(Request::Logs {
                name: "x".into(),
                follow: false
            })
        );
        for (bad, needle) in [
            (&b"not json"[..], "not JSON"),
            (b"[1,2]", "JSON object"),
            (b"{}", "no \"cmd\""),
            (br#"{"cmd":7}"#, "must be a string"),
            (br#"{"cmd":"explode"}"#, "explode"),
            (br#"{"cmd":"start"}"#, "prompt"),
            (br#"{"cmd":"status","extra":1}"#, "extra"),
            (b"\xff\xfe", "UTF-8"),
        ] {
            let err = parse_request(bad).unwrap_err();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }
    /// A stand-in for a `cargo fuzz` target (libFuzzer needs a nightly toolchain, and only
    /// stable is installed here): random bytes and mutations of valid requests never make
    /// the parser panic, and every answer is a request or a message.
    #[test]
    fn random_and_mutated_requests_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_cafe);
        let valid: Vec<&[u8]> = vec![
            br#"{"cmd":"status"}"#,
            br#"{"cmd":"start","prompt":"fix it","name":"fix","project":"app"}"#,
            br#"{"cmd":"logs","name":"x","follow":true}"#,
            br#"{"cmd":"continue","name":"x","prompt":"and then"}"#,
            br#"{"cmd":"say","text":"hi \u001b[2J"}"#,
        ];
        let alphabet = b"{}[]\":,\\ \x00\x1b\xff\xc3\xa9cmdstartnamepromptfollowtrue0123456789-e.";
        for round in 0..20_000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                (0..rng.usize(0..64))
                    .map(|_| alphabet[rng.usize(..alphabet.len())])
                    .collect()
            } else {
                valid[rng.usize(..valid.len())].to_vec()
            };
            for _ in 0..rng.usize(0..4) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.usize(..bytes.len());
                match rng.u8(0..3) {
                    0 => bytes[at] = rng.u8(..),
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, alphabet[rng.usize(..alphabet.len())]),
                }
            }
            match parse_request(&bytes) {
                Ok(request) => {
                    // What parses serialises back to a request that parses the same.
                    let again = serde_json::to_vec(&request).unwrap();
                    assert_eq!(parse_request(&again), Ok(request));
                }
                Err(message) => assert!(!message.is_empty()),
            }
        }
    }
}
