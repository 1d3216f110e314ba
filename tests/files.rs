//! walkie's files against a hostile or broken filesystem, through the real binary: links
//! planted where walkie writes, FIFOs and devices where it reads, huge and corrupt state
//! files, directories open to others or owned by someone else, a umask of 000, and API keys
//! that cannot go into a header.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
/// Long enough for any start here; a run still going after it is hung.
const HANG: Duration = Duration::from_secs(15);

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

fn state_dir(w: &Walkie) -> PathBuf {
    let dir = w.path("state/walkie");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Names in the state directory starting with `prefix`.
fn aside_files(w: &Walkie, prefix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(state_dir(w))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// `walkie <args>` in `w`'s home; None when it was still running after [`HANG`].
fn run_within(w: &Walkie, args: &[&str]) -> Option<(i32, String)> {
    let out = output_within(w.command(args), HANG)?;
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    ))
}

/// Starts walkie and waits until its loop answers: the socket accepts connections from the
/// moment it is bound, before the state file is read.
fn started(w: &mut Walkie) {
    w.start();
    w.ctl_json(&["status"]);
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_link_planted_at_the_state_temporary_is_never_followed() {
    let mut w = Walkie::new();
    let target = w.path("precious.txt");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, state_dir(&w).join("state.json.tmp")).unwrap();
    started(&mut w);
    let name = w.start_task(&["@sleep=0"]);
    w.wait_finished(&name, T);
    assert!(
        wait_until(T, || w.state_file().exists()
            && w.state_json()["tasks"]
                .as_array()
                .is_some_and(|t| t.len() == 1)),
        "the state was never saved:\n{}",
        w.log()
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    assert_eq!(
        mode_of(&target),
        0o644,
        "the target's mode is untouched too"
    );
    assert!(
        !std::fs::symlink_metadata(w.state_file())
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn walkies_own_directories_are_made_private_and_a_strangers_is_refused() {
    let mut w = Walkie::new();
    let dirs = ["state/walkie", "runtime/walkie", "data/walkie"];
    for d in dirs {
        std::fs::create_dir_all(w.path(d)).unwrap();
        std::fs::set_permissions(w.path(d), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    started(&mut w);
    for d in dirs {
        assert_eq!(mode_of(&w.path(d)), 0o700, "{d}");
    }
    assert!(w.log().contains("walkie made it 0700"), "{}", w.log());
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(w.wait_exit(T), Some(0));

    // Someone else's directory: refused, named, left as it is.
    std::os::unix::fs::chown(w.path("state/walkie"), Some(4242), Some(4242)).unwrap();
    let (code, err) = run_within(&w, &["run"]).expect("walkie run hung");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&w.path("state/walkie").display().to_string())
            && err.contains("belongs to uid 4242"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(w.path("state/walkie")).unwrap().uid(),
        4242
    );
    // A link where the runtime directory should be: refused too, nothing created through it.
    std::os::unix::fs::chown(w.path("state/walkie"), Some(0), Some(0)).unwrap();
    let elsewhere = w.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir_all(w.path("runtime/walkie")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, w.path("runtime/walkie")).unwrap();
    let (code, err) = run_within(&w, &["run"]).expect("walkie run hung");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn a_fifo_or_a_device_as_the_config_is_refused_at_once() {
    let w = Walkie::new();
    let fifo = w.path("config.fifo");
    mkfifo(&fifo);
    for (path, what) in [
        (fifo.as_path(), "is a FIFO, not a regular file"),
        (
            Path::new("/dev/zero"),
            "is a character device, not a regular file",
        ),
        (
            w.path("home").as_path(),
            "is a directory, not a regular file",
        ),
    ] {
        let path = path.to_str().unwrap();
        for args in [
            vec!["run", "--config", path],
            vec!["config", "check", path],
            vec!["doctor", "--config", path],
        ] {
            let (code, err) =
                run_within(&w, &args).unwrap_or_else(|| panic!("{args:?} hung on {path}"));
            assert_eq!(code, 2, "{args:?}: {err}");
            assert!(err.contains(&format!("{path}: {what}")), "{args:?}: {err}");
        }
    }
    // A huge configuration is not read whole either.
    let big = w.path("big.toml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(512 * 1024 * 1024).unwrap();
    let (code, err) =
        run_within(&w, &["config", "check", big.to_str().unwrap()]).expect("config check hung");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("512 MB, more than the 1 MB"), "{err}");
}

#[test]
fn a_fifo_or_a_device_as_the_state_file_is_moved_aside_and_the_daemon_starts() {
    for device in [false, true] {
        let mut w = Walkie::new();
        if device {
            std::os::unix::fs::symlink("/dev/zero", state_dir(&w).join("state.json")).unwrap();
        } else {
            mkfifo(&state_dir(&w).join("state.json"));
        }
        // It must come up (not hang on the open or read /dev/zero forever).
        started(&mut w);
        let what = if device { "character device" } else { "FIFO" };
        assert!(
            w.log().contains(what) && w.log().contains("moved to"),
            "{}",
            w.log()
        );
        let aside = aside_files(&w, "state.json.corrupt-");
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(
            peak_rss_kib(w.pid()) < 100 * 1024,
            "{} KiB",
            peak_rss_kib(w.pid())
        );
        let name = w.start_task(&["@sleep=0"]);
        w.wait_finished(&name, T);
        assert!(wait_until(T, || w.state_file().is_file()));
    }
}

#[test]
fn a_fifo_as_the_api_key_file_or_the_ca_file_is_refused_at_once() {
    // The key file: a configuration error, before anything starts.
    let w = Walkie::new();
    let fifo = w.path("key.fifo");
    mkfifo(&fifo);
    w.write_config(&w.default_config("").replace(
        "[realtime]\nurl = \"none\"\n",
        &format!(
            "[realtime]\nurl = \"wss://api.openai.com/v1/realtime\"\napi_key_file = \"{}\"\n",
            fifo.display()
        ),
    ));
    let (code, err) = run_within(&w, &["run"]).expect("walkie run hung on the key FIFO");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    let (code, out) = run_within(&w, &["doctor"]).expect("doctor hung");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  API key") && out.contains("FIFO"),
        "{out}"
    );

    // The CA file: read when the link connects; the link fails, the loop goes on.
    let mut w = Walkie::new();
    let fake = FakeRealtime::start_opts(w.dir.path(), true, &[]);
    let fifo = w.path("ca.fifo");
    mkfifo(&fifo);
    let config = w.realtime_config(&fake, "", "");
    let cert = fake.cert.as_ref().unwrap().display().to_string();
    w.write_config(&config.replace(&cert, fifo.to_str().unwrap()));
    started(&mut w);
    let mut st = Value::Null;
    assert!(
        wait_until(T, || {
            st = w.ctl_json(&["status"]);
            st["link"] == "failed"
        }),
        "{st}"
    );
    let error = st["link_error"].as_str().unwrap_or_default();
    assert!(error.contains("is a FIFO, not a regular file"), "{st}");
    let name = w.start_task(&["@sleep=0"]);
    w.wait_finished(&name, T);
}

#[test]
fn a_huge_state_file_is_not_read_and_nothing_of_it_is_lost() {
    let mut w = Walkie::new();
    // 100 MB that costs no disk: a JSON start and a hole.
    let path = state_dir(&w).join("state.json");
    std::fs::write(&path, "{\"version\":1,\"tasks\":[").unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(100 * 1024 * 1024).unwrap();
    drop(f);
    started(&mut w);
    let peak = peak_rss_kib(w.pid());
    assert!(peak < 60 * 1024, "peak RSS {peak} KiB: the file was read");
    assert!(
        w.log().contains("100 MB, more than the 16 MB"),
        "{}",
        w.log()
    );
    let aside = aside_files(&w, "state.json.corrupt-");
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::metadata(&aside[0]).unwrap().len(),
        100 * 1024 * 1024
    );
}

/// One real task record, as this walkie writes it (so the test follows the record's shape).
fn a_real_record() -> Value {
    let mut w = Walkie::new();
    started(&mut w);
    let name = w.start_task(&["--name", "model", "@sleep=0"]);
    w.wait_finished(&name, T);
    w.wait_state_json("the finished task", |s| {
        s["tasks"][0]["state"] == "succeeded"
    })["tasks"][0]
        .clone()
}

#[test]
fn a_long_registry_keeps_the_newest_tasks_and_the_whole_file_aside() {
    let model = a_real_record();
    let total = 20_000;
    let tasks: Vec<Value> = (0..total)
        .map(|i| {
            let mut r = model.clone();
            r["name"] = json!(format!("old-{i}"));
            r["id"] = json!(format!("id-{i}"));
            r
        })
        .collect();
    let content = json!({"version": 1, "tasks": tasks}).to_string();
    let mut w = Walkie::new();
    std::fs::write(state_dir(&w).join("state.json"), &content).unwrap();
    started(&mut w);
    let tasks = w.tasks();
    assert!(
        !tasks.is_empty() && tasks.len() <= 500,
        "{} tasks kept",
        tasks.len()
    );
    assert_eq!(tasks.last().unwrap()["name"], format!("old-{}", total - 1));
    assert!(
        w.log().contains("held 20000 tasks") && w.log().contains("keeps the newest"),
        "{}",
        w.log()
    );
    let aside = aside_files(&w, "state.json.full-");
    assert_eq!(aside.len(), 1, "the whole file is kept");
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), content);
}

#[test]
fn two_corrupt_state_files_never_overwrite_a_moved_aside_one() {
    let mut w = Walkie::new();
    let dir = state_dir(&w);
    // Every name this start could pick within the next minute is taken already.
    let now = unix_now();
    for secs in now.saturating_sub(2)..now + 60 {
        std::fs::write(
            dir.join(format!("state.json.corrupt-{secs}")),
            format!("older {secs}"),
        )
        .unwrap();
    }
    std::fs::write(dir.join("state.json"), "{ this one is broken too").unwrap();
    started(&mut w);
    for secs in now.saturating_sub(2)..now + 60 {
        let kept = std::fs::read_to_string(dir.join(format!("state.json.corrupt-{secs}")));
        assert_eq!(
            kept.unwrap(),
            format!("older {secs}"),
            "{secs} was overwritten"
        );
    }
    let newest: Vec<_> = aside_files(&w, "state.json.corrupt-")
        .into_iter()
        .filter(|p| std::fs::read_to_string(p).unwrap() == "{ this one is broken too")
        .collect();
    assert_eq!(
        newest.len(),
        1,
        "the new one is kept under a name of its own"
    );
    assert!(
        w.log().contains(&newest[0].display().to_string()),
        "{}",
        w.log()
    );
}

#[test]
fn a_state_file_from_a_newer_walkie_stops_the_start_and_stays_untouched() {
    let w = Walkie::new();
    let content = r#"{"version":2,"tasks":[{"name":{"a":"newer shape"}}],"transcript":[]}"#;
    std::fs::write(state_dir(&w).join("state.json"), content).unwrap();
    let (code, err) = run_within(&w, &["run"]).expect("walkie run hung");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("newer walkie") && err.contains("version 2"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(w.state_file()).unwrap(), content);
    // (Besides the instance lock, taken before the state file is read.)
    let entries: Vec<_> = std::fs::read_dir(state_dir(&w))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "walkie.lock")
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "nothing moved aside or added: {entries:?}"
    );
}

#[test]
fn under_umask_000_every_file_walkie_creates_is_private() {
    let mut w = Walkie::new();
    // `sh` sets the umask and becomes walkie (exec), so the pid is walkie's.
    let log = std::fs::File::create(w.log_file()).unwrap();
    let child = std::process::Command::new("/bin/sh")
        .args(["-c", "umask 000 && exec \"$0\" run", WALKIE])
        .env_clear()
        .envs(w.env())
        .current_dir(w.dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    w.child = Some(child);
    assert!(
        wait_until(T, || std::os::unix::net::UnixStream::connect(w.socket())
            .is_ok()),
        "{}",
        w.log()
    );
    let name = w.start_task(&["@sleep=0"]);
    w.wait_finished(&name, T);
    // The save of the finished task: the last one, so no `state.json.tmp` of a later save
    // can come and go while the directory is listed.
    w.wait_state_json("the finished task", |s| {
        s["tasks"][0]["state"] == "succeeded"
    });
    // Everything under walkie's own state and runtime directories (task logs aside: their
    // writer is the task engine's), and the directories themselves.
    let mut checked = 0;
    for top in ["state/walkie", "runtime/walkie", "data/walkie"] {
        assert_eq!(mode_of(&w.path(top)), 0o700, "{top}");
        for entry in std::fs::read_dir(w.path(top)).unwrap().flatten() {
            let path = entry.path();
            if path.file_name().unwrap() == "tasks" || path.is_dir() {
                continue;
            }
            let mode = mode_of(&path);
            assert_eq!(mode & 0o077, 0, "{} is {mode:04o}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 3, "state, lock and socket were all looked at");
}

#[test]
fn an_api_key_with_control_characters_or_non_ascii_is_a_config_error() {
    let w = Walkie::new();
    let with_env = |realtime_url: &str| {
        w.default_config("").replace(
            "[realtime]\nurl = \"none\"\n",
            &format!("[realtime]\nurl = \"{realtime_url}\"\napi_key_env = \"WALKIE_TEST_KEY\"\n"),
        )
    };
    let bad_keys = [
        "sk-abc123\r\nX-Injected: yes",
        "sk-abc\n123",
        "sk-abc\u{7}123",
        "sk-abc\u{1b}[2J123",
        "sk-abcé123",
        "sk-abc\u{200b}123",
    ];
    // Refused whether the endpoint is remote or a loopback stand-in.
    for url in [
        "wss://api.openai.com/v1/realtime",
        "ws://127.0.0.1:9/v1/realtime",
    ] {
        w.write_config(&with_env(url));
        for key in bad_keys {
            let mut cmd = w.command(&["run"]);
            cmd.env("WALKIE_TEST_KEY", key);
            let out = output_within(cmd, HANG).unwrap_or_else(|| panic!("{key:?}: walkie ran"));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{key:?} {url}: {err}");
            assert!(
                err.contains("WALKIE_TEST_KEY does not hold an API key"),
                "{key:?}: {err}"
            );
            assert!(!err.contains("sk-abc"), "the key was printed: {err}");
            let mut cmd = w.command(&["doctor"]);
            cmd.env("WALKIE_TEST_KEY", key);
            let out = output_within(cmd, HANG).expect("doctor hung");
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(1), "{key:?}: {text}");
            assert!(
                text.contains("FAIL  API key") && text.contains("does not hold an API key"),
                "{text}"
            );
        }
    }
    // The same in a key file.
    let key_file = w.path("openai.key");
    std::fs::write(&key_file, "sk-abc123\r\nX-Injected: yes\n").unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    w.write_config(&w.default_config("").replace(
        "[realtime]\nurl = \"none\"\n",
        &format!(
            "[realtime]\nurl = \"wss://api.openai.com/v1/realtime\"\napi_key_file = \"{}\"\n",
            key_file.display()
        ),
    ));
    let (code, err) = run_within(&w, &["run"]).expect("walkie ran");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not hold a key"), "{err}");
    // A good key still starts (the link then fails to connect: no network here).
    let good = with_env("ws://127.0.0.1:9/v1/realtime");
    let mut w = w;
    w.write_config(&good);
    w.extra_env
        .insert("WALKIE_TEST_KEY".into(), "sk-good-key_123".into());
    started(&mut w);
}
