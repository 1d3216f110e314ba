//! `walkie ctl`: a blocking client of the control socket (it is a short-lived command, not
//! the daemon, so plain blocking IO with timeouts is right here).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::proto::Request;

/// Exit codes (README.md, "Using it without a microphone").
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_UNREACHABLE: i32 = 3;

/// How long to wait for a reply to a non-streaming request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// How replies are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Format {
    /// The reply's data as JSON instead of text for people.
    pub json: bool,
    /// Text from agents and the model exactly as it came, escape sequences included;
    /// otherwise control characters are shown as visible escapes ([`visible`]).
    pub raw: bool,
}

/// Sends `request` and prints the reply; returns the exit code (3 when no daemon listens,
/// 1 with "busy" when it refuses more connections).
pub fn run(socket: &Path, request: &Request, format: Format) -> i32 {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        // The listen queue is full: a daemon is there but not taking more.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            eprintln!(
                "walkie: the daemon is busy (its control socket {} accepts no more connections); try again",
                socket.display()
            );
            return EXIT_FAILURE;
        }
        Err(e) => {
            eprintln!(
                "walkie: the daemon is not reachable at {} ({e}); is `walkie run` running?",
                socket.display()
            );
            return EXIT_UNREACHABLE;
        }
    };
    let streaming = matches!(
        request,
        Request::Logs { follow: true, .. } | Request::Events
    );
    if !streaming {
        let _ = stream.set_read_timeout(Some(REPLY_TIMEOUT));
    }
    let line = match serde_json::to_string(request) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("walkie: cannot encode the request: {e}");
            return EXIT_FAILURE;
        }
    };
    let sent = stream.write_all(format!("{line}\n").as_bytes());
    let mut reader = BufReader::new(stream);
    if let Err(e) = sent {
        // A daemon that refuses the connection (busy) writes why and closes before
        // reading the request: the reason is still there to read.
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = String::new();
        if let Ok(n) = reader.read_line(&mut buf) {
            if n > 0 {
                if let Ok(reply) = serde_json::from_str::<Value>(&buf) {
                    print_error(&reply, format);
                    return EXIT_FAILURE;
                }
            }
        }
        eprintln!("walkie: the daemon closed the connection ({e})");
        return EXIT_FAILURE;
    }
    let mut first = true;
    loop {
        let mut buf = String::new();
        match reader.read_line(&mut buf) {
            Ok(0) => {
                if first {
                    eprintln!("walkie: the daemon closed the connection without answering");
                    return EXIT_FAILURE;
                }
                return EXIT_OK;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("walkie: no answer from the daemon: {e}");
                return EXIT_FAILURE;
            }
        }
        let reply: Value = match serde_json::from_str(&buf) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("walkie: unreadable reply from the daemon: {e}");
                return EXIT_FAILURE;
            }
        };
        if reply.get("ok") != Some(&Value::Bool(true)) {
            if format.json {
                println!("{}", json_text(&reply.to_string(), format));
            } else {
                print_error(&reply, format);
            }
            return EXIT_FAILURE;
        }
        if format.json {
            print_json(request, &reply, format);
        } else {
            print_human(request, &reply, first, format);
        }
        first = false;
        if !streaming || reply.get("end").is_some() {
            return EXIT_OK;
        }
    }
}

/// Text from agents, the model or a server, made safe for a terminal: control characters
/// (C0 but newline and tab, DEL, C1 such as `\u{9b}`) and the bidirectional-text controls
/// become visible escapes (`\x1b`, `\u{202e}`), so what an agent printed cannot move the
/// cursor, clear the screen, retitle the window or hide text. `--raw` prints text as it is.
pub fn visible(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !is_hidden(c) {
            out.push(c);
        } else if (c as u32) < 0x100 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

fn is_hidden(c: char) -> bool {
    match c {
        '\n' | '\t' => false,
        '\0'..='\u{1f}' | '\u{7f}'..='\u{9f}' => true,
        // Bidirectional controls (Trojan Source, CVE-2021-42574) reorder what is shown.
        '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
            true
        }
        _ => false,
    }
}

/// `text` for people, unless `--raw`.
fn shown(text: &str, format: Format) -> Cow<'_, str> {
    if format.raw {
        Cow::Borrowed(text)
    } else {
        visible(text)
    }
}

/// JSON text for a terminal: serde_json leaves C1 controls and bidirectional controls as
/// they are (JSON only requires escaping below U+0020); they become `\uXXXX` escapes, which
/// keep the JSON the same value.
fn json_text(json: &str, format: Format) -> Cow<'_, str> {
    if format.raw || !json.chars().any(is_hidden) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_hidden(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn print_error(reply: &Value, format: Format) {
    let msg = reply
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("request failed");
    eprintln!("walkie: {}", shown(msg, format));
    if let Some(c) = reply.get("candidates").and_then(Value::as_array) {
        let names: Vec<&str> = c.iter().filter_map(Value::as_str).collect();
        eprintln!("candidates: {}", shown(&names.join(", "), format));
    }
}

/// `--json`: the data of the reply (the array of tasks, the status object, …).
fn print_json(request: &Request, reply: &Value, format: Format) {
    let data = match request {
        Request::Status => reply.get("status"),
        Request::Tasks => reply.get("tasks"),
        Request::Result { .. } => reply.get("task"),
        Request::Transcript => reply.get("transcript"),
        _ => None,
    };
    let text = match data {
        Some(d) => serde_json::to_string_pretty(d).unwrap_or_default(),
        None => reply.to_string(),
    };
    println!("{}", json_text(&text, format));
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn print_human(request: &Request, reply: &Value, first: bool, format: Format) {
    let show = |text: &str| shown(text, format).into_owned();
    match request {
        Request::Status => print_status(reply.get("status").unwrap_or(&Value::Null), format),
        Request::Tasks => {
            let tasks = reply
                .get("tasks")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if tasks.is_empty() {
                println!("no tasks");
                return;
            }
            let now = crate::clock::unix_ms(SystemTime::now()) as i64 / 1000;
            println!(
                "{:<24} {:<11} {:<20} {:>8}  SUMMARY",
                "NAME", "STATE", "STARTED (UTC)", "TIME"
            );
            for t in tasks {
                let running = matches!(s(&t, "state"), "running" | "waiting");
                // What it is doing while it runs; how it ended after (and whether its agent
                // still waits for a follow-up).
                let summary = t.get("summary").and_then(Value::as_str).unwrap_or("");
                let about = if running {
                    s(&t, "activity").to_owned()
                } else if t.get("warm") == Some(&Value::Bool(true)) {
                    format!("(warm) {summary}")
                } else {
                    summary.to_owned()
                };
                println!(
                    "{:<24} {:<11} {:<20} {:>8}  {}",
                    show(s(&t, "name")),
                    show(s(&t, "state")),
                    s(&t, "started_at")
                        .replacen('T', " ", 1)
                        .trim_end_matches('Z'),
                    run_time(&t, now),
                    show(&one_line(&about, 70))
                );
            }
        }
        Request::Start { .. } | Request::Continue { .. } => {
            println!("started {}", show(s(reply, "task")))
        }
        Request::Cancel { .. } => println!("cancelling {}", show(s(reply, "task"))),
        Request::Interrupt { .. } => println!("interrupting {}", show(s(reply, "task"))),
        Request::Approve { .. } => println!(
            "allowed {} to {}",
            show(s(reply, "task")),
            show(s(reply, "request"))
        ),
        Request::Deny { .. } => println!(
            "denied {} to {}",
            show(s(reply, "task")),
            show(s(reply, "request"))
        ),
        Request::Result { .. } => {
            let t = reply.get("task").unwrap_or(&Value::Null);
            println!("task:     {}", show(s(t, "name")));
            println!("state:    {}", show(s(t, "state")));
            if let Some(code) = t.get("exit_code").and_then(Value::as_i64) {
                println!("exit:     {code}");
            }
            println!("dir:      {}", show(s(t, "cwd")));
            if let Some(files) = t.get("files_changed").and_then(Value::as_array) {
                if !files.is_empty() {
                    let f: Vec<&str> = files.iter().filter_map(Value::as_str).collect();
                    println!("files:    {}", show(&f.join(", ")));
                }
            }
            let error = t.get("error").and_then(Value::as_str);
            if let Some(error) = error {
                println!("error:    {}", show(error));
            }
            // The summary is the spoken short form of the result text (or "state: error"):
            // printed only when neither says it already.
            match t.get("result_text").and_then(Value::as_str) {
                Some(text) => println!("\n{}", show(text.trim_end())),
                None if error.is_none() => println!(
                    "summary:  {}",
                    show(
                        t.get("summary")
                            .and_then(Value::as_str)
                            .unwrap_or("(none yet)")
                    )
                ),
                None => {}
            }
        }
        Request::Logs { .. } => {
            if let Some(text) = reply.get("text").and_then(Value::as_str) {
                print!("{}", show(text));
            }
            if let Some(n) = reply.get("skipped").and_then(Value::as_u64) {
                println!("[walkie: {n} bytes skipped, the terminal did not keep up]");
            }
            if reply.get("end").is_some() && !first {
                println!(
                    "[task {}: {}]",
                    show(s(reply, "task")),
                    show(s(reply, "state"))
                );
            }
            let _ = std::io::stdout().flush();
        }
        Request::Events => {
            if let Some(ev) = reply.get("event") {
                match s(ev, "kind") {
                    "finished" => println!(
                        "{} {}: {}",
                        show(s(ev, "task")),
                        show(s(ev, "state")),
                        show(s(ev, "summary"))
                    ),
                    "waiting" => println!(
                        "{} waiting: wants to {}",
                        show(s(ev, "task")),
                        show(s(ev, "request"))
                    ),
                    kind => println!("{} {}", show(s(ev, "task")), show(kind)),
                }
                let _ = std::io::stdout().flush();
            }
        }
        Request::Transcript => {
            for e in reply
                .get("transcript")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                println!(
                    "[{}] {}: {}",
                    show(s(&e, "at")),
                    show(s(&e, "role")),
                    show(s(&e, "text"))
                );
            }
        }
        Request::Say { .. } | Request::Press | Request::Release => {}
    }
}

/// How long a task has run: until now while it runs, from start to end after.
fn run_time(task: &Value, now: i64) -> String {
    let Some(start) = crate::clock::unix_from_rfc3339(s(task, "started_at")) else {
        return "-".into();
    };
    let end = match task.get("ended_at").and_then(Value::as_str) {
        Some(end) => crate::clock::unix_from_rfc3339(end).unwrap_or(start),
        None => now,
    };
    let secs = (end - start).max(0);
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
    }
}

fn print_status(st: &Value, format: Format) {
    let show = |text: &str| shown(text, format).into_owned();
    let part = |key: &str| {
        let v = st.get(key).unwrap_or(&Value::Null);
        let state = v
            .get("state")
            .and_then(Value::as_str)
            .or_else(|| v.as_str())
            .unwrap_or("?");
        match v.get("error").and_then(Value::as_str) {
            Some(e) => format!("{state} ({e})"),
            None => state.to_string(),
        }
    };
    println!("link:     {}", show(&part("link")));
    if let Some(e) = st.get("link_error").and_then(Value::as_str) {
        println!("          {}", show(e));
    }
    println!("audio:    {}", show(&part("audio")));
    println!("button:   {}", show(&part("button")));
    if let Some(button) = st.get("button") {
        if let Some(device) = button.get("device").and_then(Value::as_str) {
            let name = button
                .get("name")
                .and_then(Value::as_str)
                .map(|n| format!(" (\"{n}\")"))
                .unwrap_or_default();
            println!("          {}", show(&format!("{device}{name}")));
        }
        if let Some(chosen) = button.get("chosen").and_then(Value::as_str) {
            println!("          {}", show(chosen));
        }
    }
    let tasks = st.get("tasks").unwrap_or(&Value::Null);
    println!(
        "tasks:    {} running, {} finished",
        tasks.get("running").and_then(Value::as_u64).unwrap_or(0),
        tasks.get("finished").and_then(Value::as_u64).unwrap_or(0)
    );
    let up = st.get("uptime_s").and_then(Value::as_u64).unwrap_or(0);
    println!(
        "uptime:   {}h{:02}m{:02}s",
        up / 3600,
        up / 60 % 60,
        up % 60
    );
    if let Some(control) = st.get("control") {
        println!(
            "control:  {} of {} connections",
            control
                .get("connections")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            control.get("limit").and_then(Value::as_u64).unwrap_or(0)
        );
    }
    if let Some(turns) = st.get("recent_transcript").and_then(Value::as_array) {
        for e in turns {
            println!(
                "  {}: {}",
                show(s(e, "role")),
                show(&one_line(s(e, "text"), 90))
            );
        }
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert!(matches!(visible("plain text\n\ttab"), Cow::Borrowed(_)));
        assert_eq!(
            visible("\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\r\u{7f}"),
            "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x0d\\x7f"
        );
        assert_eq!(visible("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(visible("é ✓ 日本"), "é ✓ 日本");
        let json = serde_json::json!({"t": "a\u{1b}b\u{9b}c\u{202e}"}).to_string();
        let safe = json_text(&json, Format::default());
        assert_eq!(safe, r#"{"t":"a\u001bb\u009bc\u202e"}"#);
        let back: Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back["t"], "a\u{1b}b\u{9b}c\u{202e}", "the same value");
        let raw = Format {
            raw: true,
            ..Format::default()
        };
        assert_eq!(shown("\u{1b}[2J", raw), "\u{1b}[2J");
        assert_eq!(json_text(&json, raw), json);
    }

    #[test]
    fn run_time_keeps_one_meaning() {
        let t = |started: &str, ended: Option<&str>| serde_json::json!({"started_at": started, "ended_at": ended});
        let start = crate::clock::unix_from_rfc3339("2026-01-01T10:00:00Z").unwrap();
        assert_eq!(
            run_time(&t("2026-01-01T10:00:00Z", None), start + 42),
            "42s"
        );
        assert_eq!(
            run_time(
                &t("2026-01-01T10:00:00Z", Some("2026-01-01T10:03:05Z")),
                start + 99_999
            ),
            "3m05s"
        );
        assert_eq!(
            run_time(&t("2026-01-01T10:00:00Z", Some("2026-01-01T12:30:00Z")), 0),
            "2h30m"
        );
        assert_eq!(run_time(&t("garbage", None), start), "-");
    }
}
