//! What the guest's tests share: walkie with fake-realtime (and the fake agent) running
//! inside the guest, and ways to look at what reached the model.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{FakeRealtime, Walkie};
use crate::wire::WireTap;

/// Patience for anything that should happen soon (software emulation is 3–10× slower).
pub const T: Duration = Duration::from_secs(30);

/// A counting pattern with no zero, so received audio can be checked sample by sample for
/// order and gaps.
pub const PATTERN_PERIOD: usize = 30_011;
pub fn pattern(n: usize) -> i16 {
    let k = (n % PATTERN_PERIOD) as i32;
    (k - 15_005 + i32::from(k >= 15_005)) as i16
}

/// Where in the pattern `sample` sits (the inverse of [`pattern`]).
pub fn pattern_index(sample: i16) -> Option<usize> {
    let s = i32::from(sample);
    let k = match s {
        -15_005..=-1 => s + 15_005,
        1..=15_006 => s + 15_004,
        _ => return None,
    };
    Some(k as usize)
}

/// A distinctive "speech" the fake model answers with: no zero (silence is never part of
/// it) and no stretch that repeats (any 2 ms of it says where in the answer it is).
pub fn speech(frames: usize) -> Vec<i16> {
    (0..frames as u64)
        .map(|i| {
            let mut x = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 29;
            let v = (x % 30_000) as i16 + 1;
            if x & (1 << 40) != 0 { -v } else { v }
        })
        .collect()
}

pub fn write_wav(path: &Path, rate: u32, samples: &[i16]) {
    let data = (samples.len() * 2) as u32;
    let mut bytes = Vec::with_capacity(44 + samples.len() * 2);
    bytes.extend_from_slice(b"RIFF");
    bytes.extend_from_slice(&(36 + data).to_le_bytes());
    bytes.extend_from_slice(b"WAVEfmt ");
    bytes.extend_from_slice(&16u32.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&rate.to_le_bytes());
    bytes.extend_from_slice(&(rate * 2).to_le_bytes());
    bytes.extend_from_slice(&2u16.to_le_bytes());
    bytes.extend_from_slice(&16u16.to_le_bytes());
    bytes.extend_from_slice(b"data");
    bytes.extend_from_slice(&data.to_le_bytes());
    for s in samples {
        bytes.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// walkie in the guest, talking to fake-realtime in the guest.
pub struct Guest {
    pub w: Walkie,
    pub fake: FakeRealtime,
    pub tap: Option<WireTap>,
}

/// What the guest walkie is configured with, beside the link and the fake agent.
pub struct Setup<'a> {
    /// The `[audio]` section's body; `None`: the wav backend with the pattern as microphone.
    pub audio: Option<&'a str>,
    /// The `[button]` section's body.
    pub button: &'a str,
    /// The model's spoken answer.
    pub reply_frames: usize,
    /// Its WAV instead (24 kHz mono), if given.
    pub reply: Option<Vec<i16>>,
    pub fake_args: &'a [&'a str],
    /// Put a [`WireTap`] between walkie and the server.
    pub tap: bool,
    /// Wait for the audio devices to be open before the test goes on.
    pub wait_audio: bool,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            audio: None,
            button: "device = \"none\"",
            reply_frames: 2400,
            reply: None,
            fake_args: &[],
            tap: false,
            wait_audio: true,
        }
    }
}

impl Guest {
    pub fn start(setup: Setup<'_>) -> Guest {
        let mut w = Walkie::new();
        let dir = w.dir.path().to_path_buf();
        let reply = setup.reply.unwrap_or_else(|| speech(setup.reply_frames));
        write_wav(&dir.join("reply.wav"), 24_000, &reply);
        let script = json!({
            "default": {"say": "Here is my answer.", "wav": "reply.wav"},
            "on_system": {"say": "A task finished.", "wav": "reply.wav"},
            "after_tool": {"say": "Started.", "wav": "reply.wav"},
            "transcript": "please fix the flaky test"
        });
        std::fs::write(dir.join("script.json"), script.to_string()).unwrap();
        let script_path = dir.join("script.json").display().to_string();
        let mut args = vec!["--script", script_path.as_str()];
        args.extend_from_slice(setup.fake_args);
        let fake = FakeRealtime::start(&dir, &args);
        let audio = match setup.audio {
            Some(a) => a.to_owned(),
            None => {
                // Short: decoding it is slow under emulation, and silence follows it.
                let mic: Vec<i16> = (0..24_000 * 2).map(pattern).collect();
                write_wav(&dir.join("mic.wav"), 24_000, &mic);
                format!(
                    "backend = \"wav\"\ninput_wav = \"{}\"\nearcons = false",
                    dir.join("mic.wav").display()
                )
            }
        };
        let tap = setup.tap.then(|| WireTap::start(&fake.url));
        let mut config = w.realtime_config(&fake, "", "");
        if let Some(tap) = &tap {
            config = config.replace(&fake.url, &tap.url);
        }
        let config = config.replace(
            "[audio]\nbackend = \"none\"\n[button]\ndevice = \"none\"\n",
            &format!("[audio]\n{audio}\n[button]\n{}\n", setup.button),
        );
        assert!(config.contains(setup.button), "config template changed");
        w.write_config(&config);
        w.start();
        let g = Guest { w, fake, tap };
        g.wait_status("the link up and the audio devices open", |st| {
            st["link"] == "connected"
                && st["conversation"]["session_ready"] == true
                && (!setup.wait_audio || st["audio"]["state"] == "ok")
        });
        g
    }

    /// `walkie ctl status --json`, asked on the control socket directly: polling through
    /// the `walkie ctl` binary would cost an exec each time, slow under emulation.
    pub fn status(&self) -> Value {
        let reply = self.w.raw_request(b"{\"cmd\":\"status\"}\n");
        assert_eq!(reply["ok"], true, "{reply}");
        reply["status"].clone()
    }

    /// Waits until the status satisfies `pred`; returns it.
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut st = Value::Null;
        let ok = poll(T, || {
            st = self.status();
            pred(&st)
        });
        assert!(ok, "status never showed {what}: {st}\n{}", self.w.log());
        st
    }

    /// A control request on the socket; panics unless it is answered `ok`.
    pub fn request(&self, request: Value) -> Value {
        let reply = self.w.raw_request(format!("{request}\n").as_bytes());
        assert_eq!(reply["ok"], true, "{request} → {reply}");
        reply
    }

    /// `walkie ctl press`, `release` and `say`, straight on the socket.
    pub fn press(&self) {
        self.request(json!({"cmd": "press"}));
    }

    pub fn release(&self) {
        self.request(json!({"cmd": "release"}));
    }

    pub fn say(&self, text: &str) {
        self.request(json!({"cmd": "say", "text": text}));
    }

    /// Client events of one type received so far.
    pub fn count(&self, kind: &str) -> usize {
        self.fake.events_of_type(kind).len()
    }

    /// Waits until `n` events of `kind` were received.
    pub fn wait_count(&self, kind: &str, n: usize) {
        let mut seen = 0;
        let ok = poll(T, || {
            seen = self.count(kind);
            seen >= n
        });
        assert!(
            ok,
            "fake-realtime saw {seen} × {kind}, not {n}; it received: {:?}\n{}",
            self.fake
                .events()
                .iter()
                .map(|(_, e)| e["type"].as_str().unwrap_or("?").to_owned())
                .collect::<Vec<_>>(),
            self.w.log()
        );
    }

    /// Turns committed so far (commit followed by response.create).
    pub fn commits(&self) -> usize {
        self.count("input_audio_buffer.commit")
    }

    /// The audio sent in `input_audio_buffer.append` events, in order.
    pub fn appended_audio(&self) -> Vec<i16> {
        crate::common::appended_samples(&self.fake)
    }

    /// Stops walkie with SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) {
        self.w.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(self.w.wait_exit(T), Some(0), "{}", self.w.log());
    }

    /// Sends SIGSTOP or SIGCONT to walkie.
    pub fn pause(&self, stopped: bool) {
        use nix::sys::signal::Signal;
        self.w.signal(if stopped {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        });
    }
}

/// Checks `cond` every 100 ms until it holds or `timeout` passes; returns whether it held.
/// Slower than the host tests' 20 ms: under emulation, tight polling steals the CPU from
/// the walkie being watched.
pub fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sleeps, for the length of a physical gesture (a key held, a pause between presses);
/// never used to wait for walkie, which is waited for on conditions.
pub fn hold(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
