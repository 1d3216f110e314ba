//! The Raspberry Pi build starts: walkie and the fake agent cross-built for aarch64 run
//! under qemu-user (`qemu-aarch64 -L /` with Debian's multiarch arm64 libc — with the cross
//! toolchain's `-L /usr/aarch64-linux-gnu` the daemon hangs in `pthread_create`, because its
//! loader and the multiarch libc differ). `--version`, `config check`, and a daemon that
//! runs a task of the aarch64 fake agent and stops cleanly on SIGTERM, driven by the native
//! `walkie ctl` over the control socket.
//!
//! `tools/deps.sh test` (run by `make test`) installs the Rust target, the cross gcc,
//! `libasound2-dev:arm64` and qemu-user; without them this test fails and says so.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod common;
use common::{WALKIE, aarch64_built, wait_until};

fn qemu(bin: &Path) -> Command {
    let mut cmd = Command::new("qemu-aarch64");
    cmd.arg("-L").arg("/").arg(bin);
    cmd
}

fn run(mut cmd: Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("qemu-aarch64 (package qemu-user, installed by tools/deps.sh test)");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_aarch64_build_runs_under_qemu() {
    let dir = aarch64_built();
    let walkie = dir.join("walkie");
    let agent = dir.join("fake-agent");
    // They really are arm64 programs.
    let elf = std::fs::read(&walkie).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(
        u16::from_le_bytes([elf[18], elf[19]]),
        183,
        "e_machine is not EM_AARCH64"
    );

    let out = run({
        let mut c = qemu(&walkie);
        c.arg("--version");
        c
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("walkie {}", env!("CARGO_PKG_VERSION"))
    );

    let home = tempfile::tempdir().unwrap();
    let p = |rel: &str| home.path().join(rel);
    for sub in ["config/walkie", "state", "data", "runtime", "work"] {
        std::fs::create_dir_all(p(sub)).unwrap();
    }
    let example = run({
        let mut c = qemu(&walkie);
        c.args(["config", "example"]);
        c
    });
    std::fs::write(p("example.toml"), &example.stdout).unwrap();
    let out = run({
        let mut c = qemu(&walkie);
        c.arg("config").arg("check").arg(p("example.toml"));
        c
    });
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));

    // The daemon, with the aarch64 fake agent as its agent (also under qemu).
    let config = format!(
        r#"[realtime]
url = "none"
[audio]
backend = "none"
[button]
device = "none"
[agent]
command = ["qemu-aarch64", "-L", "/", "{agent}", "-p", "{{prompt}}", "--output-format", "stream-json", "--verbose"]
"#,
        agent = agent.display()
    );
    std::fs::write(p("config/walkie/config.toml"), config).unwrap();
    let env = [
        ("HOME", p("work")),
        ("XDG_CONFIG_HOME", p("config")),
        ("XDG_STATE_HOME", p("state")),
        ("XDG_DATA_HOME", p("data")),
        ("XDG_RUNTIME_DIR", p("runtime")),
    ];
    let log = std::fs::File::create(p("walkie.log")).unwrap();
    let mut daemon = qemu(&walkie);
    daemon
        .arg("run")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut daemon = Daemon(daemon.spawn().unwrap());
    let read_log = || std::fs::read_to_string(p("walkie.log")).unwrap_or_default();
    let ctl = |args: &[&str]| {
        Command::new(WALKIE)
            .arg("ctl")
            .args(args)
            .env_clear()
            .envs(env.iter().cloned())
            .output()
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(60), || ctl(&["status"])
            .status
            .success()),
        "the aarch64 daemon did not answer:\n{}",
        read_log()
    );
    let out = ctl(&[
        "start",
        "--name",
        "pi-task",
        "say hello from arm @text=hello-from-arm",
    ]);
    assert!(out.status.success(), "{out:?}\n{}", read_log());
    let mut tasks = serde_json::Value::Null;
    let done = wait_until(Duration::from_secs(90), || {
        let out = ctl(&["tasks", "--json"]);
        tasks = serde_json::from_slice(&out.stdout).unwrap_or_default();
        tasks[0]["state"] != "running" && !tasks[0]["state"].is_null()
    });
    assert!(done, "the task did not finish: {tasks}\n{}", read_log());
    assert_eq!(tasks[0]["state"], "succeeded", "{tasks}\n{}", read_log());
    let result = ctl(&["result", "pi-task", "--json"]);
    let result: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert!(
        result.to_string().contains("hello-from-arm"),
        "{result}\n{}",
        read_log()
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut status = None;
    assert!(wait_until(Duration::from_secs(30), || {
        status = daemon.0.try_wait().unwrap();
        status.is_some()
    }));
    assert_eq!(status.unwrap().code(), Some(0), "{}", read_log());
    assert!(read_log().contains("walkie stopped"), "{}", read_log());
}
