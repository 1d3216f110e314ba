//! No secret an agent prints leaves walkie: not in what it says to the model (the spoken
//! summary, tool outputs), not in the trace, its log, the state file, nor in `walkie ctl`
//! output. Through the real binary, fake-realtime and the fake agent printing the secrets.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// A secret and the message(s) of the agent that carry it. `secret` is the part that must not
/// show: no 8-character piece of it may appear anywhere walkie lets text out.
struct Leak {
    secret: &'static str,
    messages: &'static [&'static str],
}

/// One of each format, as an agent might print it, several broken on purpose.
const LEAKS: &[Leak] = &[
    Leak {
        secret: "Qm7xT2vLp9KdR4wZ8nYc3HbF6jGs1AeU5oIt0rVx",
        messages: &["Using key sk-proj-Qm7xT2vLp9KdR4wZ8nYc3HbF6jGs1AeU5oIt0rVx for the API."],
    },
    Leak {
        secret: "T04K2P8LM/B05R7N3QD/Xq8Lz2Vr6Tn1Wp4Ks9Hm3Jd7",
        messages: &[
            "Posting to https://hooks.slack.com/services/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 now.",
        ],
    },
    Leak {
        secret: "Zr8Kq2Lm5Xv9Tp3Wn7Hc1Jd6Fs4Gb0Ya8Qe2",
        messages: &[
            ".npmrc: //registry.npmjs.org/:_authToken=npm_Zr8Kq2Lm5Xv9Tp3Wn7Hc1Jd6Fs4Gb0Ya8Qe2",
        ],
    },
    Leak {
        secret: "Pw2Nx7Kb4Ty9Ls3Qd6Vm8Hj1Rc5Fg0Za4We7Ui2",
        messages: &["Published with npm_Pw2Nx7Kb4Ty9Ls3Qd6Vm8Hj1Rc5Fg0Za4We7Ui2 just now."],
    },
    Leak {
        secret: "Hk3Lm9Pq2Rt7Vw4Xy8Za1B.Df5Gh0Jk6Lm2Np8Qr3St9Uv4Wx7Yz1Ab5Cd0Ef6Gh2Jk3Mn",
        messages: &[
            "Mail goes through SG.Hk3Lm9Pq2Rt7Vw4Xy8Za1B.Df5Gh0Jk6Lm2Np8Qr3St9Uv4Wx7Yz1Ab5Cd0Ef6Gh2Jk3Mn today.",
        ],
    },
    Leak {
        secret: "7f3a9c2e8b1d4f6a0c5e9b3d7f1a2c4e",
        messages: &["Twilio: SK7f3a9c2e8b1d4f6a0c5e9b3d7f1a2c4e (API key)"],
    },
    Leak {
        secret: "2b8d4f6a1c3e5f7a9b0d2c4e6f8a1b3d",
        messages: &["Account SID AC2b8d4f6a1c3e5f7a9b0d2c4e6f8a1b3d, region us1."],
    },
    Leak {
        secret: "Zk9Xq3Lm7Vp2Tn8Wr4Hs1Jd6Fc0Gb5Ya9Qe3Uo7Ip2Kl8Mn4Bv6Cx1Zs5Dr0Ft3Gy7Hu2Ji9Ok4Pl6Qa8Ws",
        messages: &[
            "DefaultEndpointsProtocol=https;AccountName=walkiedata;AccountKey=Zk9Xq3Lm7Vp2Tn8Wr4Hs1Jd6Fc0Gb5Ya9Qe3Uo7Ip2Kl8Mn4Bv6Cx1Zs5Dr0Ft3Gy7Hu2Ji9Ok4Pl6Qa8Ws==;EndpointSuffix=core.windows.net",
        ],
    },
    Leak {
        secret: "Xy7Q~Rk2Lm9Zp4Vt8Wn3Hc6Jd1Fs5Gb0Ya9Qe2Um",
        messages: &["Azure client secret: Xy7Q~Rk2Lm9Zp4Vt8Wn3Hc6Jd1Fs5Gb0Ya9Qe2Um"],
    },
    Leak {
        secret: "wJq8Zr2Lx5Tv9Kp3Wn7Hc1Jd6Fs4Gb0Ya8Qe2Um5",
        messages: &[
            "Found AKIAQX7M4RT2LP9ZK3WN wJq8Zr2Lx5Tv9Kp3Wn7Hc1Jd6Fs4Gb0Ya8Qe2Um5 in the env file.",
        ],
    },
    Leak {
        secret: "AKIAQX7M4RT2LP9ZK3WN",
        messages: &[],
    },
    // A zero-width space inside the token.
    Leak {
        secret: "Lq8Zr2Kx5Tv9Wp3Nn7Hc1Jd6Fs4Gb0Ya8Qe2",
        messages: &["GitHub token ghp_Lq8Zr2Kx5\u{200B}Tv9Wp3Nn7Hc1Jd6Fs4Gb0Ya8Qe2 works."],
    },
    // A newline inside the key.
    Leak {
        secret: "Rk7Lm2Qx9Zp4Vt8Wn3Hc6Jd1Fs5Gb0Ya9Qe2Um7Io4",
        messages: &[
            "Anthropic key sk-ant-api03-Rk7Lm2Qx9Zp4\nVt8Wn3Hc6Jd1Fs5Gb0Ya9Qe2Um7Io4 is set.",
        ],
    },
    // A key split across two stream-json messages.
    Leak {
        secret: "Hq7Lz3Xm9Tp2Wv8Kn4Rc6Jd1Fs5Gb0Ya",
        messages: &[
            "Stripe key sk_live_Hq7Lz3Xm9Tp",
            "2Wv8Kn4Rc6Jd1Fs5Gb0Ya ends the config.",
        ],
    },
    Leak {
        secret: "Pz4Kq8Lm2Vr7",
        messages: &["Connected to postgres://deploy:Pz4Kq8Lm2Vr7@db.internal:5432/app fine."],
    },
    Leak {
        secret: "7c9e2f4a1b8d3e6f0a5c9b2d4e7f1a3c8b6d0e2f",
        messages: &["The session token is 7c9e2f4a1b8d3e6f0a5c9b2d4e7f1a3c8b6d0e2f for now."],
    },
    Leak {
        secret: "Hx7Lq2Zr9Kp4",
        messages: &["Set DB_PASSWORD=Hx7Lq2Zr9Kp4 in .env"],
    },
    Leak {
        secret: "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7Vq3Lm9",
        messages: &[
            "Key:\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7Vq3Lm9\nZx8Kp2Rt5Wn7Hc1Jd6Fs4Gb0Ya8Qe2Um5Io3Pl7\n-----END PRIVATE KEY-----\nSaved.",
        ],
    },
    // Split across the last two messages: the second half is the whole final answer (the
    // result line and the spoken summary come from it).
    Leak {
        secret: "Yt5Rk8Lm2Qx9Zp4Vt8Wn3Hc6Jd1Fs5Gb0Ya9Qe2Um7Io4Pl",
        messages: &[
            "Done. The new OpenAI key is sk-proj-Yt5Rk8Lm2Qx9Zp4",
            "Vt8Wn3Hc6Jd1Fs5Gb0Ya9Qe2Um7Io4Pl and everything else is fine.",
        ],
    },
];

/// Writes the agent's messages, one JSON string per line (the fake agent's `@say` file).
fn say_file(dir: &Path, name: &str, messages: &[&str]) -> String {
    let path = dir.join(name);
    let lines: Vec<String> = messages.iter().map(|m| json!(m).to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.display().to_string()
}

/// Every 8-character piece of `secret` found in `text` (the text is checked with and without
/// JSON escaping).
fn pieces_in(secret: &str, text: &str) -> Vec<String> {
    let chars: Vec<char> = secret.chars().collect();
    let n = chars.len().min(8);
    chars
        .windows(n)
        .map(|w| w.iter().collect::<String>())
        .filter(|piece| text.contains(piece.as_str()))
        .collect()
}

fn assert_clean(place: &str, text: &str) {
    for leak in LEAKS {
        let found = pieces_in(leak.secret, text);
        assert!(
            found.is_empty(),
            "{place}: pieces of {:?} leaked: {found:?}\n--- {place} ---\n{text}",
            leak.secret
        );
    }
}

/// A script that answers a typed task name with a tool call about it.
fn script(dir: &Path) -> String {
    let path = dir.join("script.json");
    let doc = json!({
        "rules": [
            {"match": "^list$", "reply": {"say": "Listing.", "call": {"name": "list_tasks", "arguments": {}}}},
            {"match": "^running-", "reply": {"say": "Checking.", "call": {"name": "task_status", "arguments": {"name": "{text}"}}}},
            {"match": "^edge-", "reply": {"say": "Checking.", "call": {"name": "task_status", "arguments": {"name": "{text}"}}}},
            {"match": "^done-", "reply": {"say": "Here.", "call": {"name": "task_result", "arguments": {"name": "{text}"}}}},
        ],
        "default": {"say": "OK."},
        "after_tool": {"say": "Done."},
        "on_system": {"say": "A task finished."},
    });
    std::fs::write(&path, doc.to_string()).unwrap();
    path.display().to_string()
}

fn connected(agent_extra: &str) -> (Walkie, FakeRealtime) {
    let mut w = Walkie::new();
    let script = script(w.dir.path());
    let fake = FakeRealtime::start(w.dir.path(), &["--script", &script]);
    w.write_config(&w.realtime_config(&fake, agent_extra, ""));
    w.extra_env
        .insert("WALKIE_TEST_KEY".into(), "sk-test-walkie-key-000".into());
    w.start_with(&["--trace", w.path("trace.jsonl").to_str().unwrap()]);
    w.wait_connected();
    (w, fake)
}

/// The outputs of the model's tool calls so far, parsed.
fn tool_outputs(fake: &FakeRealtime) -> Vec<Value> {
    fake.events_of_type("conversation.item.create")
        .into_iter()
        .filter(|e| e["item"]["type"] == "function_call_output")
        .filter_map(|e| serde_json::from_str(e["item"]["output"].as_str()?).ok())
        .collect()
}

/// Types `text` and waits for the tool output that `pred` recognises.
fn ask(w: &Walkie, fake: &FakeRealtime, text: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let (code, _, err) = w.ctl(&["say", text]);
    assert_eq!(code, 0, "{err}");
    let mut found = None;
    assert!(
        wait_until(T, || {
            found = tool_outputs(fake).into_iter().find(&pred);
            found.is_some()
        }),
        "no tool output for {text:?}: {:?}\n{}",
        tool_outputs(fake),
        w.log()
    );
    found.unwrap()
}

/// Collects a child's stdout on a thread.
fn collect(mut child: Child) -> std::thread::JoinHandle<String> {
    let mut out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        let _ = child.kill();
        let _ = child.wait();
        text
    })
}

#[test]
fn no_secret_an_agent_prints_leaves_walkie() {
    let (mut w, fake) = connected("max_running = 4");
    let messages: Vec<&str> = LEAKS
        .iter()
        .flat_map(|l| l.messages.iter().copied())
        .collect();
    let file = say_file(w.dir.path(), "secrets.jsonl", &messages);
    let mut events = w
        .command(&["ctl", "events", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut events_lines = BufReader::new(events.stdout.take().unwrap()).lines();
    let first = events_lines.next().unwrap().unwrap();
    assert!(first.contains("subscribed"), "{first}");
    let events_out = std::thread::spawn(move || {
        events_lines
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });

    // One task stays running (its recent output is what task_status shows), one finishes
    // (its answer is announced, and task_result shows it).
    w.start_task(&["--name", "running-leak", &format!("@say={file} @stall")]);
    w.start_task(&["--name", "done-leak", &format!("@say={file} @sleep=3")]);
    let follow = collect(
        w.command(&["ctl", "logs", "done-leak", "--follow"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The output of a running task (its tail in memory), as `ctl logs` shows it.
    let mut running_logs = String::new();
    assert!(wait_until(T, || {
        running_logs = w.ctl(&["logs", "running-leak"]).1;
        running_logs.contains("Saved.")
    }));
    let status = ask(&w, &fake, "running-leak", |o| {
        o.get("recent_output").is_some()
    });
    assert!(
        status["recent_output"]
            .as_str()
            .unwrap()
            .contains("[redacted]"),
        "{status}"
    );
    let done = w.wait_finished("done-leak", T);
    assert_eq!(done["state"], "succeeded", "{done}");
    fake.wait_events(T, "the completion announcement", |ev| {
        ev.iter().any(|(_, e)| {
            e["item"]["role"] == "system"
                && e["item"]["content"][0]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("done-leak"))
        })
    });
    let result = ask(&w, &fake, "done-leak", |o| o.get("result").is_some());
    assert!(
        result["result"].as_str().unwrap().contains("[redacted]"),
        "{result}"
    );
    ask(&w, &fake, "list", |o| o.get("tasks").is_some());
    w.ctl(&["cancel", "running-leak"]);
    assert_eq!(w.wait_finished("running-leak", T)["state"], "cancelled");
    let _ = events.kill();
    let _ = events.wait();

    let events_text = events_out.join().unwrap();
    assert!(
        events_text.contains("\"finished\"") && events_text.contains("done-leak"),
        "{events_text}"
    );
    let mut places: Vec<(String, String)> = Vec::new();
    for args in [
        &["tasks"][..],
        &["tasks", "--json"],
        &["result", "done-leak"],
        &["result", "done-leak", "--json"],
        &["result", "running-leak"],
        &["logs", "running-leak"],
        &["logs", "done-leak"],
        &["status"],
        &["status", "--json"],
        &["transcript", "--json"],
    ] {
        let (code, out, err) = w.ctl(args);
        assert_eq!(code, 0, "ctl {args:?}: {err}");
        places.push((format!("ctl {}", args.join(" ")), out + &err));
    }
    // The files as walkie leaves them: stopped, so every save and the trace's last
    // flush are in.
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(w.wait_exit(T), Some(0), "{}", w.log());
    let files: Vec<(String, String)> = vec![
        (
            "sent to the model (fake-realtime's record)".into(),
            std::fs::read_to_string(&fake.record).unwrap(),
        ),
        (
            "the trace".into(),
            std::fs::read_to_string(w.path("trace.jsonl")).unwrap(),
        ),
        ("walkie's log".into(), w.log()),
        (
            "state.json".into(),
            std::fs::read_to_string(w.state_file()).unwrap(),
        ),
    ];
    // The outputs were not simply empty: the redacted output made it through.
    for (place, text) in &files {
        assert!(text.contains("[redacted]"), "{place}: {text}");
    }
    places.extend(files);
    places.extend([
        ("ctl logs --follow".into(), follow.join().unwrap()),
        ("ctl events".into(), events_text),
        ("ctl logs of the running task".into(), running_logs),
    ]);
    for (place, text) in &places {
        assert_clean(place, text);
    }
    let summary = done["summary"].as_str().unwrap();
    assert!(
        summary.contains("[redacted]") && summary.contains("everything else is fine"),
        "{summary}"
    );
}

#[test]
fn task_status_shows_no_piece_of_a_key_cut_at_its_window() {
    // The key sits where the 400-character window of recent output starts, at several
    // offsets into it.
    let (w, fake) = connected("max_running = 4");
    let key = "sk-proj-CZ8hKYWHJPu05MC4jRt7Lm2Qx9Zp4Vt8Wn3Hc6Jd1Fs5Gb0Ya9Qe2Um7";
    let pads = [340, 355, 370, 385];
    for pad in pads {
        let padding = "word ".repeat(pad / 5);
        let file = say_file(
            w.dir.path(),
            &format!("edge-{pad}.jsonl"),
            &[&format!("{key} {}", padding.trim_end())],
        );
        w.start_task(&[
            "--name",
            &format!("edge-{pad}"),
            &format!("@say={file} @stall"),
        ]);
    }
    for pad in pads {
        let name = format!("edge-{pad}");
        assert!(wait_until(T, || w
            .ctl(&["logs", &name])
            .1
            .contains("word word")));
        let status = ask(&w, &fake, &name, |o| {
            o["task"] == name.as_str() && o.get("recent_output").is_some()
        });
        let recent = status["recent_output"].as_str().unwrap();
        let found = pieces_in(&key[8..], recent);
        assert!(found.is_empty(), "{name}: {found:?} in {recent:?}");
        assert!(recent.ends_with("word word."), "{recent:?}");
    }
}
