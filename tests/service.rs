//! walkie as a systemd service: the `Type=notify` protocol spoken by the real binary to a
//! test socket (READY, STATUS, the watchdog, STOPPING), and no watchdog ping while the loop
//! is wedged.

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

mod common;
use common::{Walkie, wait_until};

/// A `$NOTIFY_SOCKET` stand-in: every datagram with the time it arrived.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: String,
    rx: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), text)).is_err() {
                    break;
                }
            }
        });
        NotifySocket {
            path: path.to_str().unwrap().to_string(),
            _dir: dir,
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits until a datagram satisfying `pred` arrived; returns it.
    fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> (Instant, String) {
        if let Some(found) = self.seen.iter().find(|(_, m)| pred(m)) {
            return found.clone();
        }
        let end = Instant::now() + timeout;
        while let Ok(msg) = self
            .rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.seen.push(msg.clone());
            if pred(&msg.1) {
                return msg;
            }
        }
        panic!(
            "no matching notification in {timeout:?}; got {:?}",
            self.messages()
        );
    }

    fn messages(&mut self) -> Vec<String> {
        while let Ok(msg) = self.rx.try_recv() {
            self.seen.push(msg);
        }
        self.seen.iter().map(|(_, m)| m.clone()).collect()
    }

    fn watchdog_times(&mut self) -> Vec<Instant> {
        self.messages();
        self.seen
            .iter()
            .filter(|(_, m)| m == "WATCHDOG=1")
            .map(|(t, _)| *t)
            .collect()
    }
}

fn walkie_notifying(socket: &NotifySocket, watchdog_usec: u64) -> Walkie {
    let mut w = Walkie::new();
    w.extra_env
        .insert("NOTIFY_SOCKET".into(), socket.path.clone());
    w.extra_env
        .insert("WATCHDOG_USEC".into(), watchdog_usec.to_string());
    w
}

#[test]
fn ready_status_watchdog_and_stopping_reach_the_notify_socket() {
    let mut socket = NotifySocket::new();
    // WATCHDOG_USEC 2 s: walkie pings every second.
    let mut w = walkie_notifying(&socket, 2_000_000);
    w.start();
    let (_, ready) = socket.wait_for(Duration::from_secs(10), |m| m.starts_with("READY=1"));
    assert_eq!(ready, "READY=1\nSTATUS=link disabled; 0 task(s) running");

    // A running task shows in the status line, and goes when it ends.
    let name = w.start_task(&["--name", "sleepy", "nap @sleep=2"]);
    socket.wait_for(Duration::from_secs(10), |m| {
        m == "STATUS=link disabled; 1 task(s) running"
    });
    w.wait_finished(&name, Duration::from_secs(20));
    // walkie sends its status line at the end of the loop iteration that may already have
    // answered `ctl tasks`, and this test's receiver thread takes it from the socket after.
    let mut msgs = Vec::new();
    let back_after_running = wait_until(Duration::from_secs(20), || {
        msgs = socket.messages();
        let back = msgs
            .iter()
            .rposition(|m| m == "STATUS=link disabled; 0 task(s) running");
        let running = msgs
            .iter()
            .position(|m| m == "STATUS=link disabled; 1 task(s) running");
        back > running
    });
    assert!(back_after_running, "{msgs:?}");

    // The watchdog: pinged at half WATCHDOG_USEC, never as late as WATCHDOG_USEC.
    assert!(wait_until(Duration::from_secs(20), || socket
        .watchdog_times()
        .len()
        >= 5));
    let times = socket.watchdog_times();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(900) && gap < Duration::from_millis(2000),
            "watchdog pings {gap:?} apart (expected about 1 s): {times:?}"
        );
    }

    w.signal(Signal::SIGTERM);
    assert_eq!(w.wait_exit(Duration::from_secs(20)), Some(0));
    socket.wait_for(Duration::from_secs(5), |m| {
        m == "STOPPING=1\nSTATUS=SIGTERM: shutting down"
    });
}

#[test]
fn no_watchdog_ping_while_the_loop_is_blocked() {
    let mut socket = NotifySocket::new();
    // Pings every 250 ms; the loop blocks for 2.5 s right after READY (debug builds only).
    let mut w = walkie_notifying(&socket, 500_000);
    w.extra_env
        .insert("WALKIE_TEST_BLOCK_LOOP_MS".into(), "2500".into());
    w.start();
    let (ready_at, _) = socket.wait_for(Duration::from_secs(10), |m| m.starts_with("READY=1"));
    assert!(wait_until(Duration::from_secs(20), || socket
        .watchdog_times()
        .len()
        >= 4));
    let times = socket.watchdog_times();
    // The first ping goes with READY, before the loop blocks; the next only after it runs again.
    assert!(
        times[0] - ready_at < Duration::from_millis(250),
        "{times:?}"
    );
    assert!(
        times[1] - times[0] >= Duration::from_millis(2400),
        "a ping came {:?} after the first while the loop was blocked",
        times[1] - times[0]
    );
    // Then the loop pings again (the wait above saw at least two more).
    assert!(w.log().contains("blocking the poll loop for 2500 ms"));
}

#[test]
fn sighup_reports_reloading_then_ready() {
    let mut socket = NotifySocket::new();
    let mut w = walkie_notifying(&socket, 0);
    w.start();
    socket.wait_for(Duration::from_secs(10), |m| m.starts_with("READY=1"));
    w.signal(Signal::SIGHUP);
    socket.wait_for(Duration::from_secs(10), |m| m == "RELOADING=1");
    socket.wait_for(Duration::from_secs(10), |m| m == "READY=1");
    // WATCHDOG_USEC=0: no watchdog at all.
    assert!(
        socket.watchdog_times().is_empty(),
        "{:?}",
        socket.messages()
    );
}

// ---- the unit, `make install` and `make uninstall` ----

fn repo(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Every path under `dir`, relative, sorted.
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A home for `tools/install.sh`, with a `systemctl` on PATH that records its arguments.
struct InstallHome {
    dir: tempfile::TempDir,
}

impl InstallHome {
    fn new() -> InstallHome {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        let stub = dir.path().join("stub");
        std::fs::create_dir_all(&stub).unwrap();
        let systemctl = stub.join("systemctl");
        std::fs::write(
            &systemctl,
            format!(
                "#!/bin/sh\necho \"$*\" >>{}\n",
                dir.path().join("systemctl.log").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        InstallHome { dir }
    }

    fn home(&self) -> std::path::PathBuf {
        self.dir.path().join("home")
    }

    fn run(&self, action: &str) -> String {
        let out = std::process::Command::new(repo("tools/install.sh"))
            .arg(action)
            .env_clear()
            .env("HOME", self.home())
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", self.dir.path().join("stub").display()),
            )
            .env("BIN", common::WALKIE)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "install.sh {action} failed:\n{text}");
        text
    }

    fn systemctl_calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("systemctl.log")).unwrap_or_default()
    }
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn install_then_uninstall_leaves_no_trace() {
    let h = InstallHome::new();
    let home = h.home();
    let out = h.run("install");
    let bin = home.join(".local/bin/walkie");
    assert_eq!(mode(&bin), 0o755, "{out}");
    let unit = std::fs::read_to_string(home.join(".config/systemd/user/walkie.service")).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={} run", bin.display())),
        "{unit}"
    );
    assert!(!unit.contains('@'), "a placeholder was left: {unit}");
    let config = home.join(".config/walkie/config.toml");
    let example = std::process::Command::new(common::WALKIE)
        .args(["config", "example"])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(std::fs::read(&config).unwrap(), example);
    let env = home.join(".config/walkie/env");
    assert_eq!(mode(&env), 0o600, "the env file may hold keys");
    assert_eq!(mode(&home.join(".config/walkie")), 0o700);
    let env_text = std::fs::read_to_string(&env).unwrap();
    let path_line = env_text
        .lines()
        .find(|l| l.starts_with("PATH="))
        .expect("a PATH line");
    assert!(
        path_line.starts_with(&format!("PATH={}:", home.join(".local/bin").display())),
        "{path_line}"
    );
    assert!(
        home.join(".local/share/doc/walkie/docs/CONFIGURATION.md")
            .is_file()
    );
    assert!(home.join(".local/share/doc/walkie/LICENSE").is_file());
    assert!(
        !home.join(".local/bin/fake-agent").exists(),
        "the fake tools are not installed"
    );
    assert_eq!(h.systemctl_calls(), "--user daemon-reload\n");
    // The installed binary works from where it was put.
    let check = std::process::Command::new(&bin)
        .args(["config", "check", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    // Installing again (an upgrade) keeps the user's files and still uninstalls cleanly.
    std::fs::write(&env, "OPENAI_API_KEY=sk-mine\n").unwrap();
    let again = h.run("install");
    assert!(again.contains("kept"), "{again}");
    assert_eq!(
        std::fs::read_to_string(&env).unwrap(),
        "OPENAI_API_KEY=sk-mine\n"
    );

    let out = h.run("uninstall");
    assert!(out.contains("kept") && out.contains("env"), "{out}");
    assert_eq!(
        tree(&home),
        [".config", ".config/walkie", ".config/walkie/env"]
    );
    std::fs::remove_file(&env).unwrap();
    std::fs::remove_dir_all(home.join(".config")).unwrap();

    // A fresh install and an uninstall with nothing changed leave the home as it was.
    h.run("install");
    h.run("uninstall");
    assert_eq!(tree(&home), Vec::<String>::new());
    let calls = h.systemctl_calls();
    assert!(
        calls.contains("--user is-enabled --quiet walkie")
            && calls.ends_with("--user daemon-reload\n"),
        "{calls}"
    );
}

#[test]
fn install_never_overwrites_a_users_configuration() {
    let h = InstallHome::new();
    let home = h.home();
    let config = home.join(".config/walkie/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, "[audio]\nperiod_ms = 20\n").unwrap();
    let out = h.run("install");
    assert!(
        out.contains(&format!("kept   {}", config.display())),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "[audio]\nperiod_ms = 20\n"
    );
    // The env file was absent: it is created. A config it created and the user then
    // changed is kept by uninstall.
    let env = home.join(".config/walkie/env");
    assert!(env.is_file());
    std::fs::write(&env, "OPENAI_API_KEY=sk-changed\n").unwrap();
    h.run("uninstall");
    assert_eq!(
        tree(&home),
        [
            ".config",
            ".config/walkie",
            ".config/walkie/config.toml",
            ".config/walkie/env"
        ]
    );
}

#[test]
fn the_unit_verifies_and_says_what_the_service_needs() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = std::path::Path::new(common::WALKIE).parent().unwrap();
    let unit = std::fs::read_to_string(repo("tools/systemd/walkie.service.in"))
        .unwrap()
        .replace("@BINDIR@", bin_dir.to_str().unwrap())
        .replace("@DOCDIR@", "/usr/share/doc/walkie");
    let path = dir.path().join("walkie.service");
    std::fs::write(&path, &unit).unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["--user", "verify"])
        .arg(&path)
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .expect("systemd-analyze (installed by tools/deps.sh test)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on settings it ignores: any line it prints is a defect.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
    let settings: Vec<&str> = unit
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for wanted in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "StartLimitIntervalSec=120",
        "StartLimitBurst=5",
        "KillMode=mixed",
        "Delegate=yes",
        "LimitRTPRIO=20",
        "LimitMEMLOCK=infinity",
        "EnvironmentFile=-%h/.config/walkie/env",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(settings.contains(&wanted), "the unit lacks {wanted}");
    }
    // Nothing that does nothing in a user unit.
    assert!(
        !settings
            .iter()
            .any(|l| l.contains("network-online.target") || l.contains("sound.target"))
    );
    // The priority the unit grants is the one the audio threads ask for.
    assert!(unit.contains(&format!(
        "LimitRTPRIO={}",
        walkie::sys::sched::AUDIO_THREAD_PRIORITY
    )));
}

#[test]
fn without_a_key_walkie_says_it_runs_without_voice() {
    let mut w = Walkie::new();
    w.write_config(&w.default_config("").replace(
        "url = \"none\"",
        "url = \"wss://api.openai.com/v1/realtime\"",
    ));
    w.start();
    let status = w.ctl_json(&["status"]);
    assert_eq!(status["link"], "failed", "{status}");
    assert_eq!(
        status["link_error"],
        "no OpenAI API key: OPENAI_API_KEY is not set (or set realtime.api_key_file)",
        "said once, not \"no API key: no OpenAI API key\""
    );
    assert!(wait_until(Duration::from_secs(10), || w
        .log()
        .contains("ready without voice (the Realtime link failed)")));
    let log = w.log();
    assert!(
        log.contains("ERROR daemon: no voice: no OpenAI API key: OPENAI_API_KEY is not set"),
        "{log}"
    );
    assert!(!log.contains("no API key: no OpenAI API key"), "{log}");
}
