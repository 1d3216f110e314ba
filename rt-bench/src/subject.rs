//! The two programs under test — walkie and the Python peer — started the same way: a
//! private home, the bench server as their Realtime endpoint, the bench microphone and
//! speaker, a FIFO as the button, the fake agent as the agent, and a control socket at
//! `$XDG_RUNTIME_DIR/walkie/control.sock` answering walkie's JSON-lines protocol.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::clock::now_ns;
use crate::server::Server;

/// Which program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Impl {
    Walkie,
    Peer,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Walkie => "walkie",
            Impl::Peer => "peer",
        }
    }
}

/// The programs and where they are.
#[derive(Debug, Clone)]
pub struct Programs {
    pub walkie: PathBuf,
    /// walkie built with `--features probe`.
    pub walkie_probe: PathBuf,
    pub fake_agent: PathBuf,
    pub python: PathBuf,
    pub peer_script: PathBuf,
}

/// The audio devices a run uses: ALSA PCM names and the environment that defines them.
#[derive(Debug, Clone)]
pub struct AudioEnv {
    pub capture: String,
    /// walkie's `audio.backend` and `audio.capture_device` for this device: on the pulse
    /// device walkie records through libpulse (`backend = "pulse"`, a source name), as a
    /// user of a sound server sets it up; the peer and the bench read `capture` via ALSA.
    pub walkie_backend: &'static str,
    pub walkie_capture: String,
    pub playback: String,
    pub env: Vec<(String, String)>,
    /// The devices have no clock (ALSA file/null plugins).
    pub clockless: bool,
}

/// One instant recorded by a probe (walkie's `probe` build or the peer's `--probe`).
#[derive(Debug, Clone, Copy)]
pub struct ProbeRec {
    pub t_ns: u64,
    pub a: u64,
    pub b: u64,
}

pub type Probe = HashMap<String, Vec<ProbeRec>>;

pub struct Subject {
    pub which: Impl,
    child: Child,
    pub dir: tempfile::TempDir,
    pub control: PathBuf,
    button: PathBuf,
    button_writer: Option<File>,
    probe_file: Option<PathBuf>,
    /// Just before `spawn`.
    pub spawned_ns: u64,
    rtt_conn: Option<BufReader<UnixStream>>,
}

/// KEY_F13: the button key of both configurations.
const KEY: u16 = 183;

impl Subject {
    /// Starts `which` against `server` on `audio`; returns at once (see [`Subject::wait_ready`]).
    pub fn start(
        which: Impl,
        probe: bool,
        programs: &Programs,
        server: &Server,
        audio: &AudioEnv,
    ) -> Result<Subject, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("rt-bench-{}-", which.name()))
            .tempdir()
            .map_err(|e| e.to_string())?;
        let p = |rel: &str| dir.path().join(rel);
        for sub in ["home", "config/walkie", "state", "data", "runtime"] {
            std::fs::create_dir_all(p(sub)).map_err(|e| e.to_string())?;
        }
        let button = p("button.fifo");
        nix::unistd::mkfifo(&button, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| format!("mkfifo: {e}"))?;
        let control = p("runtime/walkie/control.sock");
        let probe_file = probe.then(|| p("probe.txt"));
        let agent = [
            programs.fake_agent.display().to_string(),
            "-p".into(),
            "{prompt}".into(),
            "--output-format".into(),
            "stream-json".into(),
            "--verbose".into(),
        ];
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            ("HOME".into(), p("home").display().to_string()),
            ("XDG_CONFIG_HOME".into(), p("config").display().to_string()),
            ("XDG_STATE_HOME".into(), p("state").display().to_string()),
            ("XDG_DATA_HOME".into(), p("data").display().to_string()),
            ("XDG_RUNTIME_DIR".into(), p("runtime").display().to_string()),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        env.extend(audio.env.iter().cloned());
        let mut cmd = match which {
            Impl::Walkie => {
                let agent_toml: Vec<String> = agent.iter().map(|a| format!("{a:?}")).collect();
                let config = format!(
                    r#"[realtime]
url = "{url}"
api_key_env = "RT_BENCH_KEY"
ca_file = "{ca}"
[audio]
backend = "{backend}"
capture_device = "{capture}"
playback_device = "{playback}"
earcons = false
[button]
device = "{button}"
key = "KEY_F13"
[agent]
command = [{agent}]
max_running = 32
cancel_grace_ms = 3000
"#,
                    url = server.url,
                    ca = server.ca_file.display(),
                    backend = audio.walkie_backend,
                    capture = audio.walkie_capture,
                    playback = audio.playback,
                    button = button.display(),
                    agent = agent_toml.join(", "),
                );
                std::fs::write(p("config/walkie/config.toml"), config)
                    .map_err(|e| e.to_string())?;
                let exe = if probe {
                    &programs.walkie_probe
                } else {
                    &programs.walkie
                };
                let mut cmd = Command::new(exe);
                cmd.arg("run");
                if let Some(f) = &probe_file {
                    env.push(("WALKIE_PROBE".into(), f.display().to_string()));
                }
                env.push(("RT_BENCH_KEY".into(), "sk-rt-bench".into()));
                cmd
            }
            Impl::Peer => {
                let config = json!({
                    "url": server.url,
                    "ca_file": server.ca_file,
                    "capture_device": audio.capture,
                    "playback_device": audio.playback,
                    "clockless": audio.clockless,
                    "button": button,
                    "control": control,
                    "agent_command": agent,
                    "state_dir": p("state/walkie"),
                    "max_running": 32,
                    "cancel_grace_ms": 3000,
                });
                std::fs::write(p("peer.json"), config.to_string()).map_err(|e| e.to_string())?;
                let mut cmd = Command::new(&programs.python);
                cmd.arg(&programs.peer_script)
                    .arg("--config")
                    .arg(p("peer.json"));
                if let Some(f) = &probe_file {
                    cmd.arg("--probe").arg(f);
                }
                cmd
            }
        };
        let log = File::create(p("subject.log")).map_err(|e| e.to_string())?;
        dies_with_the_bench(&mut cmd);
        cmd.env_clear()
            .envs(env)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let spawned_ns = now_ns();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", which.name()))?;
        Ok(Subject {
            which,
            child,
            dir,
            control,
            button,
            button_writer: None,
            probe_file,
            spawned_ns,
            rtt_conn: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("subject.log")).unwrap_or_default()
    }

    /// Waits until the control socket answers a `status` request; returns that instant.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<u64, String> {
        let end = now_ns() + timeout.as_nanos() as u64;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited during start-up ({status}):\n{}",
                    self.which.name(),
                    tail(&self.log())
                ));
            }
            if let Ok(s) = UnixStream::connect(&self.control)
                && let Ok(reply) = request_on(s, &json!({"cmd": "status"}))
                && reply["ok"] == true
            {
                return Ok(now_ns());
            }
            if now_ns() > end {
                return Err(format!(
                    "{} never answered on its control socket:\n{}",
                    self.which.name(),
                    tail(&self.log())
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits until the Realtime session is set up (the server saw `session.update`).
    pub fn wait_connected(&mut self, server: &Server) -> Result<(), String> {
        if server.wait_session(Duration::from_secs(30)) {
            Ok(())
        } else {
            Err(format!(
                "{} never set up its Realtime session:\n{}",
                self.which.name(),
                tail(&self.log())
            ))
        }
    }

    /// One request on a fresh connection.
    pub fn request(&self, req: &Value) -> Result<Value, String> {
        let s = UnixStream::connect(&self.control).map_err(|e| e.to_string())?;
        request_on(s, req)
    }

    /// The round trip of a `status` request on a kept-open connection, in ns.
    pub fn status_rtt(&mut self) -> Result<u64, String> {
        if self.rtt_conn.is_none() {
            let s = UnixStream::connect(&self.control).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            self.rtt_conn = Some(BufReader::new(s));
        }
        let conn = self.rtt_conn.as_mut().expect("connection");
        let t0 = now_ns();
        conn.get_mut()
            .write_all(b"{\"cmd\":\"status\"}\n")
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        conn.read_line(&mut line).map_err(|e| e.to_string())?;
        let t1 = now_ns();
        if line.is_empty() {
            self.rtt_conn = None;
            return Err("control connection closed".into());
        }
        Ok(t1 - t0)
    }

    /// Writes a key record to the button FIFO; the instant the write returned.
    pub fn key(&mut self, down: bool) -> Result<u64, String> {
        if self.button_writer.is_none() {
            let end = now_ns() + 5_000_000_000;
            loop {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&self.button)
                {
                    Ok(f) => {
                        self.button_writer = Some(f);
                        break;
                    }
                    Err(e) if now_ns() > end => {
                        return Err(format!("the button FIFO has no reader: {e}"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        let mut rec = Vec::with_capacity(48);
        for (kind, code, value) in [(1u16, KEY, i32::from(down)), (0, 0, 0)] {
            rec.extend_from_slice(&0i64.to_le_bytes());
            rec.extend_from_slice(&0i64.to_le_bytes());
            rec.extend_from_slice(&kind.to_le_bytes());
            rec.extend_from_slice(&code.to_le_bytes());
            rec.extend_from_slice(&value.to_le_bytes());
        }
        let w = self.button_writer.as_mut().expect("writer");
        w.write_all(&rec).map_err(|e| format!("button: {e}"))?;
        Ok(now_ns())
    }

    /// Starts `n` agent tasks through the control socket, each with `prompt`.
    pub fn start_tasks(&self, n: usize, prompt: &str) -> Result<(), String> {
        for i in 0..n {
            let reply = self
                .request(&json!({"cmd": "start", "prompt": prompt, "name": format!("load-{i}")}))?;
            if reply["ok"] != true {
                return Err(format!("{}: start refused: {reply}", self.which.name()));
            }
        }
        Ok(())
    }

    /// Tasks running now, from `status`.
    pub fn running_tasks(&self) -> u64 {
        self.request(&json!({"cmd": "status"}))
            .ok()
            .and_then(|v| v["status"]["tasks"]["running"].as_u64())
            .unwrap_or(0)
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `grace`); the instant it exited and
    /// what the probe recorded.
    pub fn stop(mut self, grace: Duration) -> (Option<u64>, Probe, String) {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = now_ns() + grace.as_nanos() as u64;
        let mut exited = None;
        while now_ns() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = Some(now_ns());
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let probe = self
            .probe_file
            .as_deref()
            .map(read_probe)
            .unwrap_or_default();
        let log = self.log();
        if std::env::var_os("RT_BENCH_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("rt-bench: kept {}", dir.keep().display());
        }
        (exited, probe, log)
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn request_on(s: UnixStream, req: &Value) -> Result<Value, String> {
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    r.get_mut()
        .write_all(format!("{req}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("reply {line:?}: {e}"))
}

fn read_probe(path: &Path) -> Probe {
    let mut out: Probe = HashMap::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 4 {
            continue;
        }
        let num = |s: &str| s.parse::<u64>().unwrap_or(0);
        out.entry(f[0].to_owned()).or_default().push(ProbeRec {
            t_ns: num(f[1]),
            a: num(f[2]),
            b: num(f[3]),
        });
    }
    out
}

/// The last lines of a log, for error messages.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// The child gets SIGTERM when rt-bench dies, however it dies (a SIGKILL, a timeout, a
/// panic that skips the clean-up): a bench cut short must not leave a daemon, a peer or a
/// sound server running. Children are spawned from the main thread, whose end is the
/// process's.
pub fn dies_with_the_bench(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_started_so_dies_with_its_parent() {
        // The kernel's "parent" is the thread that forked: one that ends stands in for a
        // bench that was killed.
        let pid = std::thread::spawn(|| {
            let child = dies_with_the_bench(&mut Command::new("sleep"))
                .arg("30")
                .spawn()
                .expect("sleep");
            let pid = child.id() as i32;
            // Reaped below by pid, once it died.
            std::mem::forget(child);
            pid
        })
        .join()
        .unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let mut status = None;
        while status.is_none() && std::time::Instant::now() < end {
            // Reaped here: the child is still this process's.
            match nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            ) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(s) => status = Some(s),
                Err(e) => panic!("waitpid: {e}"),
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        assert_eq!(
            status,
            Some(nix::sys::wait::WaitStatus::Signaled(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
                false
            )),
            "the child outlived its parent"
        );
    }
}
