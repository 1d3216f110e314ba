//! `walkie doctor` tells the truth: each broken setup it names gives a FAIL line with the
//! fix, a healthy one exits 0, and it checks what the *service* will see (the unit's
//! environment file), not the shell.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

mod common;
use common::{FAKE_AGENT, FakeRealtime, Walkie};

/// `walkie doctor`: (exit code, stdout).
fn doctor(w: &Walkie) -> (i32, String) {
    let out = w.run_cmd(&["doctor"]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The report's line for `what` (`pass  what: …`).
fn line<'a>(report: &'a str, what: &str) -> &'a str {
    report
        .lines()
        .find(|l| {
            l.get(6..)
                .is_some_and(|rest| rest.starts_with(&format!("{what}: ")))
        })
        .unwrap_or_else(|| panic!("no line for {what} in:\n{report}"))
}

/// Installs a user unit in the test home, with `env` as its environment file.
fn install_unit(w: &Walkie, env: &str) {
    let units = w.path("config/systemd/user");
    std::fs::create_dir_all(&units).unwrap();
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/systemd/walkie.service.in"),
    )
    .unwrap()
    .replace("@BINDIR@", "/opt/walkie/bin")
    .replace("@DOCDIR@", "/opt/walkie/doc");
    std::fs::write(units.join("walkie.service"), unit).unwrap();
    let env_file = w.path("home/.config/walkie/env");
    std::fs::create_dir_all(env_file.parent().unwrap()).unwrap();
    std::fs::write(&env_file, env).unwrap();
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_healthy_setup_passes_and_exits_0() {
    let mut w = Walkie::new();
    w.use_test_alsa();
    w.write_config(&w.default_config("").replace(
        "[audio]\nbackend = \"none\"",
        "[audio]\nbackend = \"alsa\"\ncapture_device = \"walkie_silence\"\nplayback_device = \"walkie_speaker\"",
    ));
    let (code, report) = doctor(&w);
    assert_eq!(code, 0, "{report}");
    assert!(
        line(&report, "configuration").starts_with("pass"),
        "{report}"
    );
    assert!(
        line(&report, "audio capture").contains("\"walkie_silence\" opens at 24 kHz mono"),
        "{report}"
    );
    assert!(
        line(&report, "audio playback").starts_with("pass"),
        "{report}"
    );
    let agent = line(&report, "agent");
    assert!(
        agent.starts_with("pass") && agent.contains("answers --version"),
        "{report}"
    );
    assert!(line(&report, "API key").contains("not needed"), "{report}");
    // No unit: a warning that says whose environment was checked.
    assert!(
        line(&report, "service").starts_with("warn")
            && line(&report, "service").contains("this shell's environment"),
        "{report}"
    );
    assert!(line(&report, "daemon").contains("not running"), "{report}");
    // Every line is pass, warn or FAIL, and every non-pass has a fix.
    for l in report.lines() {
        assert!(
            l.starts_with("pass  ") || l.starts_with("warn  ") || l.starts_with("FAIL  "),
            "{l}"
        );
        if !l.starts_with("pass") {
            assert!(l.contains(" → fix: "), "{l}");
        }
    }
}

#[test]
fn a_bad_config_lists_its_errors_and_exits_2() {
    let w = Walkie::new();
    w.write_config("[audio]\nperiod_ms = 0\n[button]\nmode = \"sideways\"\n");
    let (code, report) = doctor(&w);
    assert_eq!(code, 2, "{report}");
    assert!(
        report.starts_with("FAIL  configuration: ") && report.contains("audio.period_ms"),
        "{report}"
    );
    assert!(
        report.contains("button.mode"),
        "every error is listed:\n{report}"
    );
}

#[test]
fn a_missing_key_fails_and_names_where_it_goes() {
    let w = Walkie::new();
    w.write_config(&w.default_config("").replace(
        "url = \"none\"",
        "url = \"wss://api.openai.com/v1/realtime\"",
    ));
    let (code, report) = doctor(&w);
    assert_eq!(code, 1, "{report}");
    let key = line(&report, "API key");
    assert!(
        key.starts_with("FAIL") && key.contains("OPENAI_API_KEY is not set"),
        "{report}"
    );
    // Without a key the endpoint is not tried.
    assert!(!report.contains("Realtime endpoint"), "{report}");

    // The shell has the key, the service does not: the fix says where the service reads it.
    let mut w = w;
    w.extra_env
        .insert("OPENAI_API_KEY".into(), "sk-test-shell-only".into());
    install_unit(&w, "PATH=/usr/bin:/bin\n");
    let (code, report) = doctor(&w);
    assert_eq!(code, 1, "{report}");
    let key = line(&report, "API key");
    assert!(
        key.starts_with("FAIL")
            && key.contains("does not read your profile")
            && key.contains("/.config/walkie/env"),
        "{report}"
    );
    assert!(
        !report.contains("sk-test-shell-only"),
        "the key is never printed"
    );
}

#[test]
fn the_endpoint_is_tried_with_the_services_key() {
    let w = Walkie::new();
    let fake = FakeRealtime::start(w.dir.path(), &["--api-key", "sk-right"]);
    w.write_config(
        &w.default_config("")
            .replace("url = \"none\"", &format!("url = \"{}\"", fake.url)),
    );
    install_unit(&w, "OPENAI_API_KEY=sk-right\nPATH=/usr/bin:/bin\n");
    let (code, report) = doctor(&w);
    let endpoint = line(&report, "Realtime endpoint");
    assert!(
        endpoint.starts_with("pass") && endpoint.contains("accepted the key"),
        "{report}"
    );
    assert!(
        line(&report, "API key").contains("/.config/walkie/env"),
        "{report}"
    );
    assert!(
        !report.contains("sk-right"),
        "the key is never printed:\n{report}"
    );
    assert_eq!(code, 0, "{report}");

    install_unit(&w, "OPENAI_API_KEY=sk-wrong\nPATH=/usr/bin:/bin\n");
    let (code, report) = doctor(&w);
    let endpoint = line(&report, "Realtime endpoint");
    assert!(
        endpoint.starts_with("FAIL")
            && endpoint.contains("401")
            && endpoint.contains("invalid_api_key"),
        "{report}"
    );
    assert_eq!(code, 1, "{report}");
}

#[test]
fn an_unreachable_endpoint_is_a_warning() {
    let w = Walkie::new();
    // A port nobody listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    w.write_config(&w.default_config("").replace(
        "url = \"none\"",
        &format!("url = \"ws://127.0.0.1:{port}/v1/realtime\""),
    ));
    let (code, report) = doctor(&w);
    let endpoint = line(&report, "Realtime endpoint");
    assert!(
        endpoint.starts_with("warn") && endpoint.contains("could not reach"),
        "{report}"
    );
    assert_eq!(code, 0, "a warning is not a failure:\n{report}");
}

#[test]
fn an_unopenable_pcm_fails() {
    let mut w = Walkie::new();
    w.use_test_alsa();
    w.write_config(&w.default_config("").replace(
        "[audio]\nbackend = \"none\"",
        "[audio]\nbackend = \"alsa\"\ncapture_device = \"walkie_no_such_pcm\"\nplayback_device = \"walkie_speaker\"",
    ));
    let (code, report) = doctor(&w);
    assert_eq!(code, 1, "{report}");
    let capture = line(&report, "audio capture");
    assert!(
        capture.starts_with("FAIL")
            && capture.contains("walkie_no_such_pcm")
            && capture.contains("walkie devices"),
        "{report}"
    );
    assert!(
        line(&report, "audio playback").starts_with("pass"),
        "{report}"
    );
    assert!(
        !report.contains("ALSA lib"),
        "alsa-lib's own noise is silenced"
    );
}

#[test]
fn an_unreadable_or_wrong_button_device_fails() {
    let w = Walkie::new();
    let with_device = |device: &Path| {
        w.write_config(&w.default_config("").replace(
            "device = \"none\"",
            &format!("device = \"{}\"", device.display()),
        ));
        doctor(&w)
    };
    // A socket node: open(2) refuses it, as it refuses an evdev node without permission.
    let socket = w.path("button.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let (code, report) = with_device(&socket);
    assert_eq!(code, 1, "{report}");
    assert!(line(&report, "button").contains("cannot open"), "{report}");

    let (code, report) = with_device(&w.path("no-such-device"));
    assert_eq!(code, 1, "{report}");
    assert!(line(&report, "button").contains("No such file"), "{report}");

    let file = w.path("regular-file");
    std::fs::write(&file, b"not evdev").unwrap();
    let (code, report) = with_device(&file);
    assert_eq!(code, 1, "{report}");
    assert!(
        line(&report, "button").contains("not an input device"),
        "{report}"
    );

    let fifo = w.path("button.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (code, report) = with_device(&fifo);
    assert!(line(&report, "button").starts_with("pass"), "{report}");
    assert_eq!(code, 0, "{report}");
}

#[test]
fn an_absent_agent_fails_with_how_to_install_it() {
    let w = Walkie::new();
    w.write_config(&w.default_config("").replace(FAKE_AGENT, "claude"));
    let mut w = w;
    w.extra_env.insert("PATH".into(), "/usr/bin:/bin".into());
    let (code, report) = doctor(&w);
    assert_eq!(code, 1, "{report}");
    let agent = line(&report, "agent");
    assert!(
        agent.starts_with("FAIL")
            && agent.contains("claude is not on the PATH")
            && agent.contains("install Claude Code"),
        "{report}"
    );
}

#[test]
fn the_services_path_is_checked_not_the_shells() {
    let mut w = Walkie::new();
    let agent_dir = Path::new(FAKE_AGENT)
        .parent()
        .unwrap()
        .display()
        .to_string();
    // The agent by its bare name: the shell finds it, the service's PATH does not.
    w.write_config(&w.default_config("").replace(FAKE_AGENT, "fake-agent"));
    w.extra_env
        .insert("PATH".into(), format!("{agent_dir}:/usr/bin:/bin"));
    let (code, report) = doctor(&w);
    assert!(line(&report, "agent").starts_with("pass"), "{report}");
    assert_eq!(code, 0, "{report}");

    install_unit(
        &w,
        "OPENAI_API_KEY=sk-x\nPATH=/usr/local/bin:/usr/bin:/bin\n",
    );
    let (code, report) = doctor(&w);
    assert_eq!(code, 1, "{report}");
    let agent = line(&report, "agent");
    assert!(
        agent.starts_with("FAIL")
            && agent.contains("the service's environment")
            && agent.contains(&format!("add {agent_dir} to the PATH= line")),
        "{report}"
    );
    let service = line(&report, "service");
    assert!(
        service.starts_with("warn") && service.contains("not enabled"),
        "{report}"
    );

    // Fixed in the environment file: pass; enabled: pass.
    install_unit(&w, &format!("PATH={agent_dir}:/usr/bin:/bin\n"));
    let wants = w.path("config/systemd/user/default.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink("../walkie.service", wants.join("walkie.service")).unwrap();
    let (code, report) = doctor(&w);
    assert!(line(&report, "agent").starts_with("pass"), "{report}");
    assert!(line(&report, "service").contains("(enabled)"), "{report}");
    assert_eq!(code, 0, "{report}");

    // An environment file others can read fails.
    std::fs::set_permissions(
        w.path("home/.config/walkie/env"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, report) = doctor(&w);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("readable by other users") && report.contains("chmod 600"),
        "{report}"
    );
}
