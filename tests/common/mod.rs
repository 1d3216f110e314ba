//! Test harness: runs the real `walkie` binary in a private set of XDG directories, with the
//! fake agent (and, where a test asks for it, the fake Realtime server) as its peers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `WALKIE`'s directory joined with a file name, as a `&'static str` built at compile time
/// (so the constants stay constants: `format!("{FAKE_AGENT}")`, `.replace(FAKE_AGENT, ..)`).
macro_rules! beside_walkie {
    ($name:literal) => {{
        const DIR: &[u8] = WALKIE.as_bytes().split_at(WALKIE.len() - "walkie".len()).0;
        const LEN: usize = DIR.len() + $name.len();
        const BYTES: [u8; LEN] = {
            let (mut out, name) = ([0u8; LEN], $name.as_bytes());
            let mut i = 0;
            while i < LEN {
                out[i] = if i < DIR.len() {
                    DIR[i]
                } else {
                    name[i - DIR.len()]
                };
                i += 1;
            }
            out
        };
        match std::str::from_utf8(&BYTES) {
            Ok(path) => path,
            Err(_) => panic!("target path is not UTF-8"),
        }
    }};
}

pub const WALKIE: &str = env!("CARGO_BIN_EXE_walkie");
/// The stand-ins are binaries of the `walkie-fakes` package (tools/Cargo.toml), so users never
/// install them; cargo puts them beside `walkie`. `Walkie::new`, `FakeRealtime::start` and
/// [`fakes_built`] make sure they exist and are current before a test runs them.
pub const FAKE_AGENT: &str = beside_walkie!("fake-agent");
pub const FAKE_REALTIME: &str = beside_walkie!("fake-realtime");

/// A `cargo` command for builds from inside a test, without the variables `cargo test` set
/// for this process: build scripts track some of them (ring's reruns on
/// `CARGO_MANIFEST_DIR`), so inheriting them would rebuild half the dependency tree here and
/// again in the next ordinary build.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let set_by_cargo_test = name.starts_with("CARGO_PKG_")
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if set_by_cargo_test {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Builds the `walkie-fakes` binaries into walkie's target directory and profile, once per
/// test process. `cargo test --test tasks` builds only the walkie package's targets, so
/// without this a test would run a missing or stale fake-agent after an edit of its sources.
/// A no-op build takes well under a second; `cargo test --workspace` has built them already.
/// `WALKIE_FAKES_BUILT` set: the caller built them (the kernel tests' guest, whose root is
/// the host's, read-only, has no cargo to run).
pub fn fakes_built() {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        if std::env::var_os("WALKIE_FAKES_BUILT").is_some() {
            return;
        }
        let profile_dir = Path::new(WALKIE).parent().unwrap();
        let mut cargo = cargo();
        cargo.args(["build", "--quiet", "-p", "walkie-fakes", "--bins"]);
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cargo.arg("--release");
            }
            Some(other) => {
                cargo.args(["--profile", other]);
            }
            None => {}
        }
        // target/<profile>/walkie, or target/<triple>/<profile>/walkie with --target.
        let mut target_dir = profile_dir.parent().unwrap();
        if !target_dir.join("CACHEDIR.TAG").exists() {
            let triple = target_dir.file_name().unwrap().to_str().unwrap();
            cargo.args(["--target", triple]);
            target_dir = target_dir.parent().unwrap();
        }
        let status = cargo
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo to build the fake tools");
        assert!(status.success(), "cargo build -p walkie-fakes failed");
        assert!(Path::new(FAKE_AGENT).exists() && Path::new(FAKE_REALTIME).exists());
    });
}

/// The Raspberry Pi target (64-bit OS).
pub const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// Cross-builds walkie and the fakes for aarch64 in walkie's profile (a no-op when they are
/// current; .cargo/config.toml names the cross linker); returns the directory holding them.
/// Needs what `tools/deps.sh test` installs.
pub fn aarch64_built() -> PathBuf {
    let profile_dir = Path::new(WALKIE).parent().unwrap();
    let profile = profile_dir.file_name().unwrap().to_str().unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let mut cargo = cargo();
    cargo.args([
        "build",
        "--quiet",
        "-p",
        "walkie",
        "-p",
        "walkie-fakes",
        "--bins",
        "--target",
        AARCH64,
    ]);
    match profile {
        "debug" => {}
        "release" => {
            cargo.arg("--release");
        }
        other => {
            cargo.args(["--profile", other]);
        }
    }
    let status = cargo
        .env("CARGO_AARCH64_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "the aarch64 cross build failed: does `tools/deps.sh test` (make deps-test) run?"
    );
    target_dir.join(AARCH64).join(profile)
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Every live process whose environment carries `WALKIE_TASK` and whose parent chain is
/// not this test's (i.e. agents and their descendants of a given home).
pub fn processes_with_env(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|b| *b == 0).any(|v| v == needle.as_bytes()) && alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Zombie children of `parent`.
pub fn zombies_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next();
        let ppid: i32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == parent && state == Some("Z") {
            out.push(pid);
        }
    }
    out
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Peak resident set size of `pid` in KiB (`VmHWM`): memory a process used and gave back
/// still shows here.
pub fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `cmd` to completion unless it takes longer than `timeout`: then it is killed and
/// None returned (a hang is a test failure, never a hung test).
pub fn output_within(mut cmd: Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained on threads: a chatty child must not block on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Some(Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    })
}

/// A private home for one walkie: its directories, its config, its process.
pub struct Walkie {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub extra_env: HashMap<String, String>,
}

impl Walkie {
    /// A home whose config is the default test config plus `extra_toml` (TOML sections
    /// appended; keys in [agent], [realtime], [audio], [button] may be overridden by
    /// passing full sections through `with_config`).
    pub fn new() -> Walkie {
        fakes_built();
        let dir = tempfile::tempdir().unwrap();
        for sub in ["home", "config/walkie", "state", "data", "runtime"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let w = Walkie {
            dir,
            child: None,
            extra_env: HashMap::new(),
        };
        w.write_config(&w.default_config(""));
        w
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("config/walkie/config.toml")
    }

    pub fn state_file(&self) -> PathBuf {
        self.path("state/walkie/state.json")
    }

    pub fn socket(&self) -> PathBuf {
        self.path("runtime/walkie/control.sock")
    }

    pub fn log_file(&self) -> PathBuf {
        self.path("walkie.log")
    }

    /// The standard test configuration: the fake agent, no link, no audio, no button.
    /// `agent_extra` is added inside [agent].
    pub fn default_config(&self, agent_extra: &str) -> String {
        format!(
            r#"[realtime]
url = "none"
[audio]
backend = "none"
[button]
device = "none"
[agent]
command = ["{FAKE_AGENT}", "-p", "{{prompt}}", "--output-format", "stream-json", "--verbose"]
cancel_grace_ms = 1000
{agent_extra}
"#
        )
    }

    /// Points this walkie's ALSA at tools/alsa/walkie-test.conf with its files in the home
    /// directory (`input.raw` is the microphone, `speaker*.raw` the speakers).
    pub fn use_test_alsa(&mut self) {
        let dir = self.dir.path().to_path_buf();
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/alsa/walkie-test.conf"),
        )
        .unwrap();
        std::fs::write(
            dir.join("asound.conf"),
            template.replace("@DIR@", dir.to_str().unwrap()),
        )
        .unwrap();
        self.extra_env.insert(
            "ALSA_CONFIG_PATH".into(),
            format!(
                "/usr/share/alsa/alsa.conf:{}",
                dir.join("asound.conf").display()
            ),
        );
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "PATH".to_string(),
                std::env::var("PATH").unwrap_or_default(),
            ),
            ("HOME".to_string(), self.path("home").display().to_string()),
            (
                "XDG_CONFIG_HOME".to_string(),
                self.path("config").display().to_string(),
            ),
            (
                "XDG_STATE_HOME".to_string(),
                self.path("state").display().to_string(),
            ),
            (
                "XDG_DATA_HOME".to_string(),
                self.path("data").display().to_string(),
            ),
            (
                "XDG_RUNTIME_DIR".to_string(),
                self.path("runtime").display().to_string(),
            ),
            ("WALKIE_LOG".to_string(), "debug".to_string()),
        ];
        for (k, v) in &self.extra_env {
            env.push((k.clone(), v.clone()));
        }
        env
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(WALKIE);
        cmd.args(args)
            .env_clear()
            .envs(self.env())
            .current_dir(self.dir.path());
        cmd
    }

    /// Starts `walkie run` and waits until its control socket answers.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    pub fn start_with(&mut self, extra_args: &[&str]) {
        let mut args = vec!["run"];
        args.extend_from_slice(extra_args);
        let cmd = self.command(&args);
        self.start_command(cmd);
    }

    /// Starts `cmd` (a `walkie run` from [`Walkie::command`]) and waits until its control
    /// socket answers.
    pub fn start_command(&mut self, mut cmd: Command) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.socket();
        let ok = wait_until(Duration::from_secs(20), || {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("walkie exited early ({status}):\n{}", self.log());
                }
            }
            UnixStream::connect(&sock).is_ok()
        });
        assert!(
            ok,
            "walkie did not open its control socket:\n{}",
            self.log()
        );
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("walkie not started").id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Runs `walkie <args>` to completion.
    pub fn run_cmd(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `walkie ctl <args>`: (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let mut full = vec!["ctl"];
        full.extend_from_slice(args);
        let out = self.run_cmd(&full);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `walkie ctl <args> --json`, parsed; panics with the log when it fails.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut full: Vec<&str> = args.to_vec();
        full.push("--json");
        let (code, out, err) = self.ctl(&full);
        assert_eq!(code, 0, "ctl {args:?} failed: {err}\n{}", self.log());
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?}: not JSON ({e}): {out}"))
    }

    /// Starts a task through `walkie ctl start`; returns its name.
    pub fn start_task(&self, args: &[&str]) -> String {
        let mut full = vec!["start"];
        full.extend_from_slice(args);
        let (code, out, err) = self.ctl(&full);
        assert_eq!(code, 0, "start failed: {err}\n{}", self.log());
        out.trim()
            .strip_prefix("started ")
            .expect("started NAME")
            .to_string()
    }

    pub fn tasks(&self) -> Vec<Value> {
        self.ctl_json(&["tasks"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn task(&self, name: &str) -> Value {
        self.tasks()
            .into_iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no task {name}"))
    }

    /// Waits until task `name` is in a state other than running; returns its record.
    pub fn wait_finished(&self, name: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(timeout, || {
            last = self.task(name);
            last["state"] != "running"
        });
        assert!(ok, "task {name} still running: {last}\n{}", self.log());
        last
    }

    /// Sends raw bytes on the control socket and reads one reply line.
    pub fn raw_request(&self, bytes: &[u8]) -> Value {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply not JSON ({e}): {line:?}"))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the daemon to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn state_json(&self) -> Value {
        let text = std::fs::read_to_string(self.state_file()).unwrap();
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("state file is not valid JSON ({e}): {text}"))
    }

    /// Waits until the state file holds what `pred` looks for; returns it. walkie saves
    /// it on its own thread (with an fsync), after `ctl` already reports the change, and a
    /// fresh home has no file at all until the first save: never read it once and assume.
    pub fn wait_state_json(&self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(Duration::from_secs(30), || {
            if !self.state_file().exists() {
                return false;
            }
            // Saved by a rename: a file that is there is whole.
            last = self.state_json();
            pred(&last)
        });
        assert!(
            ok,
            "the state file never had {what}: {last}\n{}",
            self.log()
        );
        last
    }

    /// The working directory of a task (scratch dir).
    pub fn task_cwd(&self, name: &str) -> PathBuf {
        PathBuf::from(self.task(name)["cwd"].as_str().unwrap())
    }
}

impl Walkie {
    /// A daemon that was SIGKILLed (on purpose, or at the end of a test that ran out of
    /// time) leaves its `walkie-<hash>` cgroup subtree for the next start with the same
    /// state directory — which, for a test's temporary one, never comes. What it left is
    /// killed and removed here, found from the containment line of the log.
    fn remove_own_cgroups(&self) {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let mut bases: Vec<PathBuf> = log
            .lines()
            .filter_map(|l| l.split_once("containment: each task in its own cgroup under "))
            .filter_map(|(_, rest)| rest.split_once(" (").map(|(p, _)| PathBuf::from(p)))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("walkie-"))
            })
            .collect();
        bases.dedup();
        for base in bases {
            let Ok(dir) = std::fs::read_dir(&base) else {
                continue;
            };
            let tasks: Vec<PathBuf> = dir
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists())
                .collect();
            for task in &tasks {
                let _ = std::fs::write(task.join("cgroup.kill"), "1");
            }
            for task in &tasks {
                // cgroup.kill is asynchronous: the directory empties once its processes died.
                wait_until(Duration::from_secs(2), || std::fs::remove_dir(task).is_ok());
            }
            let _ = std::fs::remove_dir(&base);
        }
    }
}

impl Drop for Walkie {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.remove_own_cgroups();
        if std::thread::panicking() {
            let mut log = String::new();
            if let Ok(mut f) = std::fs::File::open(self.log_file()) {
                let _ = f.read_to_string(&mut log);
            }
            let tail: String = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("--- walkie log (tail) ---\n{tail}");
        }
    }
}

/// Kills a process we know only by pid (cleanup of grandchildren in tests).
pub fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The fake Realtime server (tools/fake-realtime) as a child process.
pub struct FakeRealtime {
    pub child: Child,
    pub url: String,
    pub control_port: u16,
    pub record: PathBuf,
    pub cert: Option<PathBuf>,
}

impl FakeRealtime {
    /// Starts it in `dir` with extra arguments (e.g. `--script`, `--session-seconds`).
    pub fn start(dir: &Path, extra: &[&str]) -> FakeRealtime {
        Self::start_opts(dir, false, extra)
    }

    pub fn start_opts(dir: &Path, tls: bool, extra: &[&str]) -> FakeRealtime {
        let record = dir.join("received.jsonl");
        let cert = dir.join("fake-ca.pem");
        fakes_built();
        let mut cmd = Command::new(FAKE_REALTIME);
        cmd.arg("--record").arg(&record).args(extra);
        if tls {
            cmd.arg("--tls").arg("--cert-out").arg(&cert);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let (mut url, mut control_port) = (String::new(), 0);
        while url.is_empty() {
            let mut line = String::new();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "fake-realtime exited before listening"
            );
            if let Some(c) = line.trim().strip_prefix("control ") {
                control_port = c.rsplit(':').next().unwrap().parse().unwrap();
            } else if let Some(u) = line.trim().strip_prefix("listening ") {
                url = format!("{u}/v1/realtime");
            }
        }
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = reader.read_to_string(&mut sink);
        });
        FakeRealtime {
            child,
            url,
            control_port,
            record,
            cert: tls.then_some(cert),
        }
    }

    /// Sends one control command; returns the reply.
    pub fn control(&self, cmd: Value) -> Value {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.control_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    pub fn state(&self) -> Value {
        self.control(serde_json::json!({"cmd": "state"}))
    }

    /// Every record line so far.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The client events received (in order), with their connection number.
    pub fn events(&self) -> Vec<(u64, Value)> {
        self.records()
            .into_iter()
            .filter_map(|r| Some((r["conn"].as_u64()?, r.get("event")?.clone())))
            .collect()
    }

    pub fn events_of_type(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// Waits until `pred` holds for the received events.
    pub fn wait_events(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&[(u64, Value)]) -> bool,
    ) {
        let mut last = Vec::new();
        let ok = wait_until(timeout, || {
            last = self.events();
            pred(&last)
        });
        assert!(
            ok,
            "fake-realtime never saw {what}; received: {:#?}",
            last.iter()
                .map(|(c, e)| (c, e["type"].clone()))
                .collect::<Vec<_>>()
        );
    }
}

impl Drop for FakeRealtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Walkie {
    /// The test configuration pointed at a fake Realtime server.
    pub fn realtime_config(
        &self,
        fake: &FakeRealtime,
        agent_extra: &str,
        realtime_extra: &str,
    ) -> String {
        let ca = fake
            .cert
            .as_ref()
            .map(|c| format!("ca_file = \"{}\"\n", c.display()))
            .unwrap_or_default();
        self.default_config(agent_extra).replace(
            "[realtime]\nurl = \"none\"\n",
            &format!("[realtime]\nurl = \"{}\"\napi_key_env = \"WALKIE_TEST_KEY\"\n{ca}{realtime_extra}\n", fake.url),
        )
    }

    /// Waits until `walkie ctl status` says the link is connected and the session ready.
    pub fn wait_connected(&self) {
        let mut st = Value::Null;
        let ok = wait_until(Duration::from_secs(20), || {
            st = self.ctl_json(&["status"]);
            st["link"] == "connected" && st["conversation"]["session_ready"] == true
        });
        assert!(ok, "never connected: {st}\n{}", self.log());
    }
}

/// The Python with the official OpenAI SDK (`make sdk-venv`).
pub fn sdk_python() -> PathBuf {
    let p = std::env::var_os("WALKIE_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run `make sdk-venv` (or `make test`), or set WALKIE_SDK_PYTHON",
        p.display()
    );
    p
}

/// Validates every sent event of a trace file with the SDK models; returns the event
/// types it checked.
pub fn check_trace_with_sdk(trace: &Path) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/sdk-check/check_trace.py");
    let out = Command::new(sdk_python())
        .arg(script)
        .arg(trace)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "SDK check failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = text.lines().last().unwrap_or("");
    last.split_once(": ")
        .map(|(_, k)| k.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// A microphone signal in which any 16 consecutive samples occur once: xorshift noise from
/// `seed` with no zero (so silence is recognisable).
pub fn mic_signal(seed: u32, frames: usize) -> Vec<i16> {
    let mut x = seed;
    (0..frames)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let s = (x >> 16) as i16;
            if s == 0 { 1 } else { s }
        })
        .collect()
}

/// Every sample fake-realtime received in `input_audio_buffer.append` events, in order.
pub fn appended_samples(fake: &FakeRealtime) -> Vec<i16> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    fake.events_of_type("input_audio_buffer.append")
        .iter()
        .flat_map(|e| b64.decode(e["audio"].as_str().unwrap()).unwrap())
        .collect::<Vec<u8>>()
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Voluntary context switches of each of `pid`'s threads, by thread name (the main thread
/// is "walkie").
pub fn thread_wakeups(pid: i32) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let n: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        *out.entry(comm.trim().to_string()).or_insert(0) += n;
    }
    out
}
