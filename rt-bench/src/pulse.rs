//! A private PulseAudio server: the clocked device. Null sinks and a null source run on
//! PulseAudio's own timer, as a sound card runs on its crystal, and are reached through
//! the ALSA `pulse` plugin (Debian's libasound2-plugins) — the path a desktop Raspberry Pi
//! OS image takes (there PipeWire answers as the pulse server).
//!
//! Started in a temporary `XDG_RUNTIME_DIR`/`HOME` with only what the bench needs loaded:
//! the native protocol on a socket of its own, a null sink `speaker` (the subjects'
//! speaker), a null sink `mic` (the bench plays the microphone signal into it; subjects
//! capture its monitor) and a null source `silence`. All at 24 kHz mono s16, so nothing
//! resamples.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::clock::now_ns;

pub struct Pulse {
    child: Child,
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    keepalive: Vec<std::thread::JoinHandle<()>>,
}

const SPEC: &str = "rate=24000 channels=1 format=s16le";

impl Pulse {
    pub fn start() -> Result<Pulse, String> {
        let dir = tempfile::Builder::new()
            .prefix("rt-bench-pulse-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let socket = dir.path().join("native");
        let log = std::fs::File::create(dir.path().join("pulse.log")).map_err(|e| e.to_string())?;
        let child = crate::subject::dies_with_the_bench(&mut Command::new("pulseaudio"))
            .args([
                "-n",
                "--daemonize=no",
                "--exit-idle-time=-1",
                "--use-pid-file=no",
                "--disallow-exit",
                "--log-target=stderr",
                "--log-level=error",
            ])
            .arg(format!(
                "--load=module-native-protocol-unix socket={} auth-anonymous=1",
                socket.display()
            ))
            .arg(format!("--load=module-null-sink sink_name=speaker {SPEC}"))
            .arg(format!("--load=module-null-sink sink_name=mic {SPEC}"))
            .arg(format!(
                "--load=module-null-source source_name=silence {SPEC}"
            ))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot start pulseaudio ({e}): run rt-bench/setup.sh (make bench does)")
            })?;
        let mut pulse = Pulse {
            child,
            dir,
            socket,
            stop: Arc::new(AtomicBool::new(false)),
            keepalive: Vec::new(),
        };
        let end = now_ns() + 10_000_000_000;
        while !pulse.socket.exists() {
            if let Ok(Some(status)) = pulse.child.try_wait() {
                return Err(format!("pulseaudio exited ({status}): {}", pulse.log()));
            }
            if now_ns() > end {
                return Err(format!("pulseaudio did not start: {}", pulse.log()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(pulse)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pulse.log")).unwrap_or_default()
    }

    /// Keeps the null sinks rendering in small blocks: each plays a silent stream of the
    /// bench's own, at 10 ms periods. A null sink with no stream renders in blocks of up
    /// to 2 s and re-arms its timer only after the current one, so a stream that starts
    /// (or is uncorked) on an idle null sink waits up to that long for its first request.
    /// A sound card's sink reschedules at once; silence mixed in changes no sample.
    /// Call after [`Pulse::client_env`] is in this process's environment.
    pub fn keep_sinks_awake(&mut self) -> Result<(), String> {
        for sink in ["speaker", "mic"] {
            let pcm = alsa::PCM::new(&pcm(sink), alsa::Direction::Playback, false)
                .map_err(|e| format!("pulse keep-alive on {sink}: {e}"))?;
            {
                let hw = alsa::pcm::HwParams::any(&pcm).map_err(|e| e.to_string())?;
                hw.set_access(alsa::pcm::Access::RWInterleaved)
                    .map_err(|e| e.to_string())?;
                hw.set_format(alsa::pcm::Format::S16LE)
                    .map_err(|e| e.to_string())?;
                hw.set_channels(1).map_err(|e| e.to_string())?;
                hw.set_rate(24_000, alsa::ValueOr::Nearest)
                    .map_err(|e| e.to_string())?;
                hw.set_period_size_near(240, alsa::ValueOr::Nearest)
                    .map_err(|e| e.to_string())?;
                hw.set_buffer_size_near(960).map_err(|e| e.to_string())?;
                pcm.hw_params(&hw).map_err(|e| e.to_string())?;
            }
            let stop = Arc::clone(&self.stop);
            let t = std::thread::Builder::new()
                .name(format!("bench-pulse-{sink}"))
                .spawn(move || {
                    let Ok(io) = pcm.io_i16() else { return };
                    let silence = [0i16; 240];
                    while !stop.load(Ordering::Acquire) {
                        if io.writei(&silence).is_err() {
                            let _ = pcm.prepare();
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
            self.keepalive.push(t);
        }
        // Let the sinks settle into the short blocks before anything is measured.
        std::thread::sleep(Duration::from_millis(2500));
        Ok(())
    }

    /// The environment a client needs: where the server is. The PCMs are the system's
    /// `pulse` PCM with a device argument ([`pcm`]).
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![(
            "PULSE_SERVER".into(),
            format!("unix:{}", self.socket.display()),
        )]
    }
}

/// The ALSA name of a pulse sink or source (`pcm.pulse` of libasound2-plugins takes it as
/// its DEVICE argument).
pub fn pcm(device: &str) -> String {
    format!("pulse:DEVICE={device}")
}

impl Drop for Pulse {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.keepalive.drain(..) {
            let _ = t.join();
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = now_ns() + 3_000_000_000;
        while now_ns() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
