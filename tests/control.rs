//! The control socket against hostile clients, through the real binary and real sockets:
//! one that never reads its replies, one that floods requests, idle ones that fill every
//! slot; and `walkie ctl`'s output against an agent that prints escape sequences.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// Writes `line` `count` times on `s` until the daemon stops taking them for a while (it
/// stopped reading this client) or all are written; returns how many lines went out.
fn write_until_refused(s: &mut UnixStream, line: &[u8], count: usize) -> usize {
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let batch: Vec<u8> = line.repeat(100);
    let mut sent = 0;
    while sent < count {
        if s.write_all(&batch).is_err() {
            break;
        }
        sent += 100;
    }
    sent
}

#[test]
fn a_client_that_never_reads_its_replies_cannot_grow_the_daemon() {
    let mut w = Walkie::new();
    w.start();
    // Its log tail (64 KiB) is what each `logs` reply carries.
    let name = w.start_task(&["--name", "big", "@flood=300K"]);
    w.wait_finished(&name, T);
    let before = rss_kib(w.pid());
    let mut hog = UnixStream::connect(w.socket()).unwrap();
    let sent = write_until_refused(&mut hog, b"{\"cmd\":\"logs\",\"name\":\"big\"}\n", 20_000);
    // Another client is still served, at once.
    let st = w.ctl_json(&["status"]);
    assert_eq!(st["tasks"]["finished"], 1);
    let peak = peak_rss_kib(w.pid());
    eprintln!("RSS before {before} KiB, peak {peak} KiB; {sent} requests written");
    assert!(
        peak < before + 64 * 1024,
        "RSS {before} KiB before, peak {peak} KiB after {sent} unread `logs` requests"
    );
    assert!(
        sent < 20_000,
        "the daemon kept reading a client that reads nothing"
    );
    // The stalled client is dropped in the end, and said so.
    let ok = wait_until(Duration::from_secs(60), || {
        w.ctl_json(&["status"])["control"]["connections"] == 1
    });
    assert!(ok, "the stalled connection was never dropped:\n{}", w.log());
    assert!(w.log().contains("read none of its"), "{}", w.log());
    drop(hog);
    assert_eq!(w.ctl_json(&["status"])["tasks"]["finished"], 1);
}

#[test]
fn a_client_flooding_requests_does_not_hold_up_another() {
    let mut w = Walkie::new();
    w.start();
    let flood = UnixStream::connect(w.socket()).unwrap();
    let mut writer = flood.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = writer.write_all(&b"{\"cmd\":\"status\"}\n".repeat(60_000));
    });
    // The flooder reads its replies; each carries the daemon's request counter.
    let (seen, last) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (seen2, last2) = (Arc::clone(&seen), Arc::clone(&last));
    std::thread::spawn(move || {
        for line in BufReader::new(flood).lines() {
            let Ok(line) = line else { break };
            let reply: Value = serde_json::from_str(&line).unwrap();
            if let Some(n) = reply["status"]["control"]["requests"].as_u64() {
                last2.store(n, Ordering::SeqCst);
            }
            seen2.fetch_add(1, Ordering::SeqCst);
        }
    });
    assert!(
        wait_until(T, || seen.load(Ordering::SeqCst) >= 2_000),
        "the flooder got {} replies\n{}",
        seen.load(Ordering::SeqCst),
        w.log()
    );
    let before = last.load(Ordering::SeqCst);
    let st = w.ctl_json(&["status"]);
    let at = st["control"]["requests"]
        .as_u64()
        .expect("status reports requests served");
    eprintln!(
        "served {} flood requests between the flooder's last reply and the status",
        at - before
    );
    // Between the flooder's latest reply and this one, the daemon served only what sat in
    // the socket buffers and a few budgets of the flood — not the flood's backlog.
    assert!(
        at - before < 5_000,
        "{} flood requests were served before another client's one status",
        at - before
    );
    assert!(
        at < 50_000,
        "the flood was nearly all served before another client's status ({at})"
    );
}

#[test]
fn a_full_daemon_says_busy_not_not_running() {
    let mut w = Walkie::new();
    w.start();
    // Followers never time out. Each is in once the daemon says it subscribed (a slot
    // of a connection that just closed may still count for an iteration: then try again).
    let subscribe = || loop {
        let mut s = UnixStream::connect(w.socket()).unwrap();
        let _ = s.write_all(b"{\"cmd\":\"events\"}\n");
        s.set_read_timeout(Some(T)).unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.contains("subscribed") {
            return s;
        }
        assert!(line.contains("busy"), "{line}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut followers: Vec<UnixStream> = (0..63).map(|_| subscribe()).collect();
    // 63 followers and this status: all 64 slots.
    assert_eq!(w.ctl_json(&["status"])["control"]["connections"], 64);
    followers.push(subscribe());
    let (code, _, err) = w.ctl(&["status"]);
    assert_eq!(code, 1, "busy is not \"not running\" (3): {err}");
    assert!(
        err.contains("the daemon is busy") && !err.contains("not reachable"),
        "{err}"
    );
    // The raw protocol says so too (the request may not even be read: the write can fail).
    let mut s = UnixStream::connect(w.socket()).unwrap();
    let _ = s.write_all(b"{\"cmd\":\"status\"}\n");
    s.set_read_timeout(Some(T)).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["busy"], true, "{reply}");
    // One follower leaves: a slot is free again.
    drop(followers.pop());
    assert!(wait_until(T, || w.ctl(&["status"]).0 == 0), "{}", w.log());
}

#[test]
fn idle_connections_are_closed_and_free_their_slots() {
    let mut w = Walkie::new();
    w.start();
    let mut idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(w.socket()).unwrap())
        .collect();
    // The lock-out: `walkie ctl` then says busy, not "not running".
    let (code, _, err) = w.ctl(&["status"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the daemon is busy"), "{err}");
    // They ask nothing: they are closed with a reason, and the daemon serves again.
    assert!(
        wait_until(T, || w.ctl(&["status"]).0 == 0),
        "still locked out:\n{}",
        w.log()
    );
    for s in idle.iter_mut().take(3) {
        s.set_read_timeout(Some(T)).unwrap();
        let mut said = String::new();
        s.read_to_string(&mut said).unwrap();
        assert!(said.contains("idle for"), "{said:?}");
    }
    // A connection that keeps asking is not idle, however long it lives.
    let mut busy = UnixStream::connect(w.socket()).unwrap();
    busy.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(busy.try_clone().unwrap());
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(4));
        busy.write_all(b"{\"cmd\":\"tasks\"}\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":true"), "{line}");
    }
}

/// What an agent may print: a window title with BEL, clear screen, a C1 CSI, a bidi override.
const HOSTILE: &str = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\u{202e}";

fn assert_visible(what: &str, out: &str) {
    for c in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}'] {
        assert!(!out.contains(c), "{what} printed {c:?} raw: {out:?}");
    }
    assert!(out.contains("\\x1b]0;pwned\\x07"), "{what}: {out:?}");
}

#[test]
fn ctl_shows_escape_sequences_from_agents_instead_of_obeying_them() {
    let mut w = Walkie::new();
    w.start();
    let prompt = format!("@text=look{HOSTILE}here");
    let name = w.start_task(&["--name", "evil", &prompt]);
    w.wait_finished(&name, T);
    for args in [vec!["tasks"], vec!["result", "evil"], vec!["logs", "evil"]] {
        let (code, out, err) = w.ctl(&args);
        assert_eq!(code, 0, "{err}");
        assert_visible(&format!("ctl {args:?}"), &out);
    }
    for args in [vec!["tasks", "--json"], vec!["result", "evil", "--json"]] {
        let (code, out, _) = w.ctl(&args);
        assert_eq!(code, 0);
        for c in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}'] {
            assert!(!out.contains(c), "ctl {args:?} printed {c:?} raw");
        }
        // Still JSON with the same text in it.
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v.to_string().contains("pwned"));
    }
    // --raw asks for the bytes as they are.
    for args in [
        vec!["logs", "evil", "--raw"],
        vec!["result", "evil", "--raw"],
    ] {
        let (code, out, _) = w.ctl(&args);
        assert_eq!(code, 0);
        assert!(out.contains(HOSTILE), "ctl {args:?}: {out:?}");
    }
}

#[test]
fn ctl_tasks_has_a_header_and_one_time_column_and_result_says_things_once() {
    let mut w = Walkie::new();
    w.start();
    let done = w.start_task(&["--name", "done", "@text=All_fixed_and_tested."]);
    w.wait_finished(&done, T);
    w.start_task(&["--name", "going", "@stall"]);
    let (code, out, _) = w.ctl(&["tasks"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NAME")
            && lines[0].contains("STARTED (UTC)")
            && lines[0].contains("TIME"),
        "{out}"
    );
    let tasks = w.tasks();
    for (row, task) in lines[1..].iter().zip(&tasks) {
        // The started column is the start, whatever the state.
        let started = task["started_at"].as_str().unwrap().replacen('T', " ", 1);
        assert!(
            row.contains(started.trim_end_matches('Z')),
            "{row} / {task}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("done") && l.contains("succeeded"))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("going") && l.contains("running"))
    );
    let (code, out, _) = w.ctl(&["result", "done"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("All fixed and tested.").count(), 1, "{out}");
}
