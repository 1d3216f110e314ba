//! The command line as a newcomer meets it: `--help` on every command, a suggestion for a
//! misspelled one, `config check` listing every error, `config init` on a fresh account, and
//! `button learn` finding the pressed key through the same record reader the daemon uses.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{WALKIE, Walkie};

fn walkie(home: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(WALKIE)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_has_help() {
    let home = tempfile::tempdir().unwrap();
    for (path, text) in walkie::help::TOPICS {
        let mut args: Vec<&str> = path.split(' ').collect();
        args.push("--help");
        let (code, out, err) = walkie(home.path(), &args);
        assert_eq!(code, 0, "walkie {path} --help: {err}");
        assert_eq!(out.trim_end(), text.trim_end(), "walkie {path} --help");
        // `help X` and `-h` say the same.
        let mut args: Vec<&str> = vec!["help"];
        args.extend(path.split(' '));
        assert_eq!(walkie(home.path(), &args).1, out, "walkie help {path}");
    }
    // The cases from the issue: options after the command, and with other arguments.
    let (code, out, _) = walkie(home.path(), &["ctl", "start", "--name", "x", "-h"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("usage: walkie ctl start"), "{out}");
    let (code, out, _) = walkie(home.path(), &["run", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--trace FILE"), "{out}");
    let (code, out, _) = walkie(home.path(), &["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("walkie COMMAND --help"), "{out}");
}

#[test]
fn a_misspelled_command_gets_a_suggestion() {
    let home = tempfile::tempdir().unwrap();
    for (args, hint) in [
        (vec!["ctl", "stauts"], "did you mean \"status\"?"),
        (vec!["ctl", "cancle", "x"], "did you mean \"cancel\"?"),
        (vec!["doctr"], "did you mean \"doctor\"?"),
        (vec!["config", "chekc"], "did you mean \"check\"?"),
        (vec!["button", "lern"], "did you mean \"learn\"?"),
    ] {
        let (code, _, err) = walkie(home.path(), &args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(hint), "{args:?}: {err}");
    }
    let (code, _, err) = walkie(home.path(), &["frobnicate"]);
    assert_eq!(code, 2);
    assert!(!err.contains("did you mean"), "{err}");
}

#[test]
fn config_check_reports_every_error() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("bad.toml");
    std::fs::write(
        &file,
        "[audio]\nperiod_ms = 0\ncolour = 1\n[button]\nmode = \"sideways\"\n[realtime]\nvoice = \"nobody\"\n",
    )
    .unwrap();
    let (code, out, err) = walkie(home.path(), &["config", "check", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    let lines: Vec<&str> = err.lines().collect();
    let f = file.display().to_string();
    assert_eq!(lines.len(), 4, "{err}");
    for (line, start) in lines.iter().zip([
        format!("{f}:2: audio.period_ms"),
        format!("{f}:3: unknown key \"colour\""),
        format!("{f}:5: button.mode"),
        format!("{f}:7: realtime.voice"),
    ]) {
        assert!(line.starts_with(&start), "expected {start}…, got {line}");
    }
}

#[test]
fn config_init_works_on_a_fresh_account_and_never_overwrites() {
    let home = tempfile::tempdir().unwrap();
    // A fresh account: no ~/.config at all (the issue's `config example > …` failed here).
    let (code, out, err) = walkie(home.path(), &["config", "init"]);
    assert_eq!(code, 0, "{err}");
    let file = home.path().join(".config/walkie/config.toml");
    assert!(out.contains(&file.display().to_string()), "{out}");
    let (_, example, _) = walkie(home.path(), &["config", "example"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), example);
    let (code, out, _) = walkie(home.path(), &["config", "check"]);
    assert_eq!(code, 0, "{out}");

    std::fs::write(&file, "[audio]\nperiod_ms = 20\n").unwrap();
    let (code, _, err) = walkie(home.path(), &["config", "init"]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "[audio]\nperiod_ms = 20\n"
    );
}

#[test]
fn button_learn_names_the_key_pressed_on_a_record_fifo() {
    let w = Walkie::new();
    let fifo = w.path("button.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut child = w
        .command(&[
            "button",
            "learn",
            "--device",
            fifo.to_str().unwrap(),
            "--timeout",
            "30",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    // A release, a repeat and a sync come first and are not taken for the press.
    for (kind, code, value) in [(1u16, 30u16, 0i32), (1, 30, 2), (0, 0, 0), (1, 0x220, 1)] {
        writer
            .write_all(&walkie::button::records::InputRecord::new(kind, code, value).to_bytes())
            .unwrap();
    }
    let done = common::wait_until(Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(done, "button learn did not finish");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("press the key you want to use"), "{stderr}");
    let f = fifo.display();
    assert!(
        stdout.starts_with(&format!("pressed BTN_DPAD_UP (code 544) on {f}\n")),
        "{stdout}"
    );
    assert!(
        stdout.ends_with(&format!("device = \"{f}\"\nkey = \"BTN_DPAD_UP\"\n")),
        "{stdout}"
    );
    // Nothing pressed: exit 1 after the timeout.
    let out = w
        .command(&[
            "button",
            "learn",
            "--device",
            fifo.to_str().unwrap(),
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key was pressed in 1 s"));
}

/// Every command `walkie --help` lists has its own help topic (a command added to the usage
/// without one fails here).
#[test]
fn every_listed_command_has_its_own_topic() {
    let home = tempfile::tempdir().unwrap();
    let (_, usage, _) = walkie(home.path(), &["--help"]);
    let mut seen = 0;
    for line in usage.lines().filter(|l| l.starts_with("  walkie ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [first, command, rest @ ..] = words.as_slice() else {
            continue;
        };
        if *first != "walkie" || command.starts_with('[') || command.starts_with("COMMAND") {
            continue;
        }
        let path: Vec<&str> = match (*command, rest.first()) {
            ("ctl" | "config" | "button", Some(sub)) if !sub.starts_with('[') => {
                vec![command, sub]
            }
            _ => vec![command],
        };
        let topic =
            walkie::help::topic(&path).unwrap_or_else(|| panic!("no help topic for {path:?}"));
        let wanted = format!("usage: walkie {}", path.join(" "));
        assert!(
            topic.starts_with(&wanted),
            "`walkie {} --help` shows another command's help:\n{topic}",
            path.join(" ")
        );
        seen += 1;
    }
    assert!(seen >= 15, "only {seen} commands found in:\n{usage}");
}
