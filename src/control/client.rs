//! `walkie ctl`: a blocking client of the control socket (it is a short-lived command, not
//! the daemon, so plain blocking IO with timeouts is right here).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::proto::Request;

/// Exit codes of DESIGN.md §3.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_UNREACHABLE: i32 = 3;

/// How long to wait for a reply to a non-streaming request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends `request` and prints the reply (raw JSON lines with `json`); returns the exit code.
pub fn run(socket: &Path, request: &Request, json: bool) -> i32 {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
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
    if let Err(e) = stream.write_all(format!("{line}\n").as_bytes()) {
        eprintln!("walkie: cannot talk to the daemon: {e}");
        return EXIT_UNREACHABLE;
    }
    let mut reader = BufReader::new(stream);
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
            if json {
                println!("{reply}");
            } else {
                print_error(&reply);
            }
            return EXIT_FAILURE;
        }
        if json {
            print_json(request, &reply, first);
        } else {
            print_human(request, &reply, first);
        }
        first = false;
        if !streaming || reply.get("end").is_some() {
            return EXIT_OK;
        }
    }
}

fn print_error(reply: &Value) {
    let msg = reply
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("request failed");
    eprintln!("walkie: {msg}");
    if let Some(c) = reply.get("candidates").and_then(Value::as_array) {
        let names: Vec<&str> = c.iter().filter_map(Value::as_str).collect();
        eprintln!("candidates: {}", names.join(", "));
    }
}

/// `--json`: the data of the reply (the array of tasks, the status object, …).
fn print_json(request: &Request, reply: &Value, _first: bool) {
    let data = match request {
        Request::Status => reply.get("status"),
        Request::Tasks => reply.get("tasks"),
        Request::Result { .. } => reply.get("task"),
        Request::Transcript => reply.get("transcript"),
        _ => None,
    };
    match data {
        Some(d) => println!("{}", serde_json::to_string_pretty(d).unwrap_or_default()),
        None => println!("{reply}"),
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn print_human(request: &Request, reply: &Value, first: bool) {
    match request {
        Request::Status => print_status(reply.get("status").unwrap_or(&Value::Null)),
        Request::Tasks => {
            let tasks = reply
                .get("tasks")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if tasks.is_empty() {
                println!("no tasks");
            }
            for t in tasks {
                let summary = t.get("summary").and_then(Value::as_str).unwrap_or("");
                let when = t
                    .get("ended_at")
                    .and_then(Value::as_str)
                    .unwrap_or(s(&t, "started_at"));
                println!(
                    "{:<24} {:<11} {:<20} {}",
                    s(&t, "name"),
                    s(&t, "state"),
                    when,
                    one_line(summary, 70)
                );
            }
        }
        Request::Start { .. } | Request::Continue { .. } => {
            println!("started {}", s(reply, "task"))
        }
        Request::Cancel { .. } => println!("cancelling {}", s(reply, "task")),
        Request::Result { .. } => {
            let t = reply.get("task").unwrap_or(&Value::Null);
            println!("task:     {}", s(t, "name"));
            println!("state:    {}", s(t, "state"));
            if let Some(code) = t.get("exit_code").and_then(Value::as_i64) {
                println!("exit:     {code}");
            }
            println!("dir:      {}", s(t, "cwd"));
            if let Some(files) = t.get("files_changed").and_then(Value::as_array) {
                if !files.is_empty() {
                    let f: Vec<&str> = files.iter().filter_map(Value::as_str).collect();
                    println!("files:    {}", f.join(", "));
                }
            }
            println!(
                "summary:  {}",
                t.get("summary")
                    .and_then(Value::as_str)
                    .unwrap_or("(none yet)")
            );
            if let Some(text) = t.get("result_text").and_then(Value::as_str) {
                println!("\n{text}");
            }
        }
        Request::Logs { .. } => {
            if let Some(text) = reply.get("text").and_then(Value::as_str) {
                print!("{text}");
            }
            if let Some(n) = reply.get("skipped").and_then(Value::as_u64) {
                println!("[walkie: {n} bytes skipped, the terminal did not keep up]");
            }
            if reply.get("end").is_some() && !first {
                println!("[task {}: {}]", s(reply, "task"), s(reply, "state"));
            }
            let _ = std::io::stdout().flush();
        }
        Request::Events => {
            if let Some(ev) = reply.get("event") {
                match s(ev, "kind") {
                    "finished" => {
                        println!("{} {}: {}", s(ev, "task"), s(ev, "state"), s(ev, "summary"))
                    }
                    kind => println!("{} {kind}", s(ev, "task")),
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
                println!("[{}] {}: {}", s(&e, "at"), s(&e, "role"), s(&e, "text"));
            }
        }
        Request::Say { .. } | Request::Press | Request::Release => {}
    }
}

fn print_status(st: &Value) {
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
    println!("link:     {}", part("link"));
    if let Some(e) = st.get("link_error").and_then(Value::as_str) {
        println!("          {e}");
    }
    println!("audio:    {}", part("audio"));
    println!("button:   {}", part("button"));
    if let Some(button) = st.get("button") {
        if let Some(device) = button.get("device").and_then(Value::as_str) {
            let name = button
                .get("name")
                .and_then(Value::as_str)
                .map(|n| format!(" (\"{n}\")"))
                .unwrap_or_default();
            println!("          {device}{name}");
        }
        if let Some(chosen) = button.get("chosen").and_then(Value::as_str) {
            println!("          {chosen}");
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
    if let Some(turns) = st.get("recent_transcript").and_then(Value::as_array) {
        for e in turns {
            println!("  {}: {}", s(e, "role"), one_line(s(e, "text"), 90));
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
