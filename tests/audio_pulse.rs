//! `audio.backend = "pulse"` through the real binary and a real PulseAudio server (Debian's
//! `pulseaudio`, started privately per test with null sinks, the clocked device rt-bench
//! uses; installed by `make test`'s setup, rt-bench/setup.sh). The microphone is the
//! monitor of a null sink `mic` into which `pacat` plays a known signal; the speaker is
//! ALSA's `null` PCM (playback stays on ALSA with this backend).
//!
//! What is checked is behaviour seen from outside: the audio fake-realtime receives, the
//! latency the server was asked for (`pactl list sources`: "configured"), walkie's
//! per-thread wake-ups in `/proc`, and `walkie ctl status`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// A private PulseAudio server: null sinks `mic` and `speaker`, at 24 kHz mono s16 so
/// nothing resamples, on a socket of its own.
struct Pulse {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Pulse {
    fn start(dir: &Path) -> Pulse {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("native");
        let spec = "rate=24000 channels=1 format=s16le";
        let child = Command::new("pulseaudio")
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
            .arg(format!("--load=module-null-sink sink_name=mic {spec}"))
            .arg(format!("--load=module-null-sink sink_name=speaker {spec}"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir)
            .env("XDG_RUNTIME_DIR", dir)
            .env("XDG_CONFIG_HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pulseaudio (make test installs it: rt-bench/setup.sh)");
        let pulse = Pulse {
            child,
            dir: dir.to_path_buf(),
            socket,
        };
        assert!(
            wait_until(T, || pulse.pactl(&["info"]).is_some()),
            "pulseaudio did not start"
        );
        pulse
    }

    fn server(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            .env("PULSE_SERVER", self.server());
        cmd
    }

    fn pactl(&self, args: &[&str]) -> Option<String> {
        let out = output_within(
            {
                let mut c = self.client("pactl");
                c.args(args);
                c
            },
            Duration::from_secs(10),
        )?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The latency the monitor of `mic` was configured for, in µs: what its reader asked.
    fn mic_latency_us(&self) -> Option<u64> {
        let text = self.pactl(&["list", "sources"])?;
        let block = text
            .split("Source #")
            .find(|b| b.contains("Name: mic.monitor"))?;
        let line = block.lines().find(|l| l.trim().starts_with("Latency:"))?;
        line.split("configured ")
            .nth(1)?
            .trim()
            .strip_suffix("usec")?
            .trim()
            .parse()
            .ok()
    }

    /// Plays `samples` into the `mic` sink at real-time pace (pacat), in the background.
    fn play_into_mic(&self, samples: &[i16], dir: &Path) -> Child {
        let raw = dir.join("mic.raw");
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        std::fs::write(&raw, bytes).unwrap();
        self.client("pacat")
            .args([
                "--playback",
                "--device=mic",
                "--rate=24000",
                "--channels=1",
                "--format=s16le",
                "--raw",
                "--latency-msec=20",
            ])
            .stdin(std::fs::File::open(&raw).unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pacat (pulseaudio-utils; make test installs it)")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Voluntary context switches of all of `pid`'s threads together.
fn wakeups(pid: i32) -> u64 {
    thread_wakeups(pid).values().sum()
}

/// walkie with the pulse backend recording from `mic.monitor` of `server`, connected to
/// fake-realtime; no earcons (their echo padding trims the pre-roll on purpose).
fn pulse_walkie(server: &str) -> (Walkie, FakeRealtime) {
    let mut w = Walkie::new();
    let dir = w.dir.path().to_path_buf();
    std::fs::write(
        dir.join("script.json"),
        json!({"default": {"say": "ok", "audio_ms": 200}}).to_string(),
    )
    .unwrap();
    let fake = FakeRealtime::start(
        &dir,
        &["--script", dir.join("script.json").to_str().unwrap()],
    );
    w.write_config(&w.realtime_config(&fake, "", "").replace(
        "[audio]\nbackend = \"none\"\n",
        "[audio]\nbackend = \"pulse\"\ncapture_device = \"mic.monitor\"\n\
         playback_device = \"null\"\nearcons = false\n",
    ));
    w.extra_env.insert("PULSE_SERVER".into(), server.into());
    w.start();
    w.wait_connected();
    (w, fake)
}

/// Holds the button until audio flows, then a little longer, releases, and checks the turn
/// ended with audio from `mic` (after a server or source came back: a null sink that has
/// just started renders its first block of up to 2 s before it takes a reader's latency).
fn talk_and_hear(w: &Walkie, fake: &FakeRealtime, mic: &[i16], when: &str) {
    let (code, _, err) = w.ctl(&["press"]);
    assert_eq!(code, 0, "{err}");
    fake.wait_events(T, &format!("audio {when}"), |ev| {
        ev.iter()
            .any(|(_, e)| e["type"] == "input_audio_buffer.append")
    });
    std::thread::sleep(Duration::from_millis(300));
    let (code, _, err) = w.ctl(&["release"]);
    assert_eq!(code, 0, "{err}");
    fake.wait_events(T, "commit", |ev| {
        ev.iter()
            .any(|(_, e)| e["type"] == "input_audio_buffer.commit")
    });
    let sent = appended_samples(fake);
    let tail = &sent[sent.len().saturating_sub(16)..];
    assert!(
        tail.len() == 16 && mic.windows(16).any(|m| m == tail),
        "no microphone audio {when}"
    );
}

/// Once the capture is back: a signal into `mic`, and a turn that must carry it.
fn hear_again(pulse: &Pulse, dir: &Path, w: &Walkie, fake: &FakeRealtime, when: &str) {
    let mic = mic_signal(0x2545_F491, 24_000 * 20);
    let mut player = pulse.play_into_mic(&mic, dir);
    wait_capture(w, "ok");
    talk_and_hear(w, fake, &mic, when);
    let _ = player.kill();
    let _ = player.wait();
}

/// Waits until the capture's state is `state` and returns its status.
fn wait_capture(w: &Walkie, state: &str) -> serde_json::Value {
    assert!(
        wait_until(T, || capture_status(w)["state"] == state),
        "the capture never became {state}: {}\n{}",
        capture_status(w),
        w.log()
    );
    capture_status(w)
}

fn capture_status(w: &Walkie) -> serde_json::Value {
    w.ctl_json(&["status"])["audio"]["capture"].clone()
}

#[test]
fn the_microphone_comes_whole_from_pulseaudio_and_idle_asks_the_server_for_large_fragments() {
    let base = tempfile::tempdir().unwrap();
    let pulse = Pulse::start(&base.path().join("pulse"));
    let mic = mic_signal(0x2545_F491, 24_000 * 30);
    let mut player = pulse.play_into_mic(&mic, base.path());
    let (w, fake) = pulse_walkie(&pulse.server());
    assert_eq!(wait_capture(&w, "ok")["device"], "pulse:mic.monitor");

    // Idle: the server is asked for fragments of the capture thread's linger (250 ms on
    // this backend), not of a period, so the source behind it can sleep as long.
    assert!(
        wait_until(T, || pulse.mic_latency_us() == Some(250_000)),
        "idle walkie left mic.monitor at {:?} µs",
        pulse.mic_latency_us()
    );
    // And walkie itself does not wake for the packets (the server sends one every few
    // milliseconds here: pacat keeps the sink at 20 ms). The capture thread reads in
    // bursts, 4 times a second; a reader woken per packet or per period wakes hundreds of
    // times.
    let window = Duration::from_secs(3);
    let before = wakeups(w.pid());
    std::thread::sleep(window);
    let woke = wakeups(w.pid()) - before;
    assert!(
        woke < 40 * window.as_secs(),
        "walkie woke {woke} times in {window:?} of idle"
    );

    // The button: the server is asked for one-period fragments while it is held.
    let (code, _, err) = w.ctl(&["press"]);
    assert_eq!(code, 0, "{err}");
    let held_from = Instant::now();
    assert!(
        wait_until(T, || pulse.mic_latency_us() == Some(10_000)),
        "held: mic.monitor at {:?} µs, not one 10 ms period",
        pulse.mic_latency_us()
    );
    std::thread::sleep(Duration::from_millis(600));
    let held = held_from.elapsed();
    let (code, _, err) = w.ctl(&["release"]);
    assert_eq!(code, 0, "{err}");
    fake.wait_events(T, "commit", |ev| {
        ev.iter()
            .any(|(_, e)| e["type"] == "input_audio_buffer.commit")
    });
    let sent = appended_samples(&fake);
    assert!(sent.len() > 24_000 / 2, "only {} frames sent", sent.len());
    // One contiguous stretch of what pacat played, bit for bit: nothing lost where the
    // fragment size changed, nothing twice.
    let start = mic
        .windows(16)
        .position(|win| win == &sent[..16])
        .expect("the first samples sent come from the microphone");
    assert!(
        sent[..] == mic[start..start + sent.len()],
        "the audio sent is not one contiguous stretch of the microphone"
    );
    // The whole pre-roll (300 ms) went out before the live audio of the hold.
    let sent_ms = sent.len() as u64 / 24;
    let floor = 300 + held.as_millis() as u64 - 20;
    assert!(
        sent_ms >= floor,
        "{sent_ms} ms sent for a 300 ms pre-roll and a {held:?} hold (at least {floor} ms)"
    );
    // Back to large fragments once the turn is over.
    assert!(
        wait_until(T, || pulse.mic_latency_us() == Some(250_000)),
        "after the turn mic.monitor stayed at {:?} µs",
        pulse.mic_latency_us()
    );
    let _ = player.kill();
    let _ = player.wait();
}

#[test]
fn no_sound_server_is_a_clear_status_and_walkie_records_once_one_comes_and_after_it_restarts() {
    let base = tempfile::tempdir().unwrap();
    let pulse_dir = base.path().join("pulse");
    let server = format!("unix:{}", pulse_dir.join("native").display());
    let (w, fake) = pulse_walkie(&server);
    // Nobody answers: the capture says why, the rest of walkie works.
    wait_capture(&w, "failed");
    let error = capture_status(&w)["error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        error.starts_with(&format!("cannot connect to PulseAudio (server: {server})")),
        "{error}"
    );
    let (code, out, _) = w.ctl(&["tasks"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(w.ctl_json(&["status"])["link"], "connected");

    // The server comes: walkie connects within its backoff (at most 5 s).
    let mut pulse = Pulse::start(&pulse_dir);
    wait_capture(&w, "ok");
    // The server goes away mid-stream: failed, with the reason.
    pulse.stop();
    wait_capture(&w, "failed");
    let error = capture_status(&w)["error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        error.contains("pulse:mic.monitor") || error.contains("cannot connect to PulseAudio"),
        "{error}"
    );
    // And back: the microphone works again.
    let pulse = Pulse::start(&pulse_dir);
    hear_again(&pulse, base.path(), &w, &fake, "after the server came back");
}

#[test]
fn doctor_records_from_the_pulse_source_or_says_why_not() {
    let base = tempfile::tempdir().unwrap();
    let pulse_dir = base.path().join("pulse");
    let mut w = Walkie::new();
    w.write_config(&w.default_config("").replace(
        "[audio]\nbackend = \"none\"\n",
        "[audio]\nbackend = \"pulse\"\ncapture_device = \"mic.monitor\"\nplayback_device = \"null\"\n",
    ));
    w.extra_env.insert(
        "PULSE_SERVER".into(),
        format!("unix:{}", pulse_dir.join("native").display()),
    );
    let capture_line = |w: &Walkie| {
        let out = w.run_cmd(&["doctor"]);
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        report
            .lines()
            .find(|l| l.get(6..).is_some_and(|r| r.starts_with("audio capture: ")))
            .unwrap_or_else(|| panic!("no audio capture line in:\n{report}"))
            .to_owned()
    };
    let line = capture_line(&w);
    assert!(
        line.starts_with("FAIL") && line.contains("cannot connect to PulseAudio"),
        "{line}"
    );
    let _pulse = Pulse::start(&pulse_dir);
    let line = capture_line(&w);
    assert!(
        line.starts_with("pass") && line.contains("PulseAudio source \"mic.monitor\""),
        "{line}"
    );
    w.write_config(&w.default_config("").replace(
        "[audio]\nbackend = \"none\"\n",
        "[audio]\nbackend = \"pulse\"\ncapture_device = \"nosuch\"\nplayback_device = \"null\"\n",
    ));
    let line = capture_line(&w);
    assert!(
        line.starts_with("FAIL") && line.contains("cannot record from nosuch"),
        "{line}"
    );
}

#[test]
fn a_source_removed_while_walkie_records_fails_the_capture_only_and_it_comes_back() {
    let base = tempfile::tempdir().unwrap();
    let pulse = Pulse::start(&base.path().join("pulse"));
    let (w, fake) = pulse_walkie(&pulse.server());
    wait_capture(&w, "ok");
    // The sink whose monitor walkie records goes away (a USB headset unplugged).
    let modules = pulse.pactl(&["list", "short", "modules"]).unwrap();
    let mic_module = modules
        .lines()
        .find(|l| l.contains("sink_name=mic"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the mic sink's module")
        .to_owned();
    pulse.pactl(&["unload-module", &mic_module]).unwrap();
    wait_capture(&w, "failed");
    // Reopening names the source that is missing; walkie, its link and its control
    // socket go on.
    assert!(
        wait_until(T, || capture_status(&w)["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot record from mic.monitor"))),
        "{}",
        capture_status(&w)
    );
    assert_eq!(w.ctl_json(&["status"])["link"], "connected");
    assert_eq!(w.ctl_json(&["status"])["audio"]["playback"]["state"], "ok");
    // Plugged in again: recording resumes and reaches the model.
    pulse
        .pactl(&[
            "load-module",
            "module-null-sink",
            "sink_name=mic",
            "rate=24000",
            "channels=1",
            "format=s16le",
        ])
        .unwrap();
    hear_again(&pulse, base.path(), &w, &fake, "after the source came back");
}

/// A "sound server" that accepts connections and never answers (a wedged PulseAudio or
/// PipeWire): every connection is kept open and counted.
fn silent_server(socket: &Path) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for conn in listener.incoming().flatten() {
            kept.push(conn);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    accepted
}

#[test]
fn a_sound_server_that_never_answers_fails_the_capture_in_bounded_time_and_never_holds_the_stop() {
    use std::sync::atomic::Ordering;
    let base = tempfile::tempdir().unwrap();
    let socket = base.path().join("native");
    let accepted = silent_server(&socket);
    let (mut w, _fake) = pulse_walkie(&format!("unix:{}", socket.display()));
    // The open gives up after its 5 s and says why; the link and the control socket never
    // waited for it.
    let status = wait_capture(&w, "failed");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|e| e.contains("PulseAudio did not answer within 5 s")),
        "{status}"
    );
    assert_eq!(w.ctl_json(&["status"])["link"], "connected");
    // walkie tries again (after its backoff) and the server hangs again: a stop now must
    // not wait out the open's timeout. (libpulse may connect more than once per open.)
    let before = accepted.load(Ordering::SeqCst);
    assert!(before >= 1, "walkie never connected to the server");
    assert!(
        wait_until(T, || accepted.load(Ordering::SeqCst) > before),
        "walkie never tried the server again: {}",
        capture_status(&w)
    );
    let asked = Instant::now();
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(w.wait_exit(T), Some(0), "{}", w.log());
    let took = asked.elapsed();
    // The open's timeout is 5 s; walkie checks for the stop every 50 ms while it waits.
    assert!(
        took < Duration::from_millis(2500),
        "the stop waited {took:?} for a sound server that never answers\n{}",
        w.log()
    );
    assert!(!w.log().contains("given up"), "{}", w.log());
}
