//! The measurements. Each runs one subject (or both, for the soak) against a fresh bench
//! server and microphone, drives it from outside (button FIFO, control socket, server
//! events), and turns the instants the bench, the server, the microphone and — where no
//! outside view exists — the probe recorded into distributions.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::clock::{now_ns, sleep_until};
use crate::mic::{Mic, untag};
use crate::procstat;
use crate::pulse::{Pulse, pcm};
use crate::report::Figure;
use crate::server::{AutoReply, Server, SpeakReport, tone};
use crate::stats::Dist;
use crate::subject::{AudioEnv, Impl, Probe, Programs, Subject};

/// How long each part runs: the full run (`make bench`) or the smoke run (`--quick`).
#[derive(Debug, Clone)]
pub struct Plan {
    pub settle: Duration,
    pub idle: Duration,
    pub hold: Duration,
    pub responses: usize,
    pub barge_ins: usize,
    pub tool_calls: usize,
    pub load_window: Duration,
    pub load_tool_calls: usize,
    pub agents: Vec<usize>,
    pub soak: Duration,
    pub starts: usize,
    pub shutdowns: usize,
}

impl Plan {
    pub fn full(soak: Duration) -> Plan {
        Plan {
            settle: Duration::from_secs(2),
            idle: Duration::from_secs(15),
            hold: Duration::from_secs(8),
            responses: 25,
            barge_ins: 15,
            tool_calls: 100,
            load_window: Duration::from_secs(6),
            load_tool_calls: 40,
            agents: vec![1, 5, 10, 20],
            soak,
            starts: 20,
            shutdowns: 5,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            settle: Duration::from_millis(300),
            idle: Duration::from_secs(1),
            hold: Duration::from_millis(600),
            responses: 2,
            barge_ins: 1,
            tool_calls: 3,
            load_window: Duration::from_millis(500),
            load_tool_calls: 2,
            agents: vec![1, 10],
            soak: Duration::from_secs(2),
            starts: 2,
            shutdowns: 1,
        }
    }
}

/// Everything a scenario needs.
pub struct Bench {
    pub programs: Programs,
    pub plan: Plan,
    pub pulse: Option<Pulse>,
    pub figures: Vec<Figure>,
    /// Per-thread idle figures, for the JSON and the docs.
    pub idle_threads: Vec<serde_json::Value>,
    pub notes: Vec<String>,
}

fn build_of(which: Impl, probe: bool) -> &'static str {
    match (which, probe) {
        (Impl::Walkie, false) => "release",
        (Impl::Walkie, true) => "release+probe",
        (Impl::Peer, _) => "python",
    }
}

/// A microphone and speaker for one subject run.
struct Devices {
    audio: AudioEnv,
    mic: Mic,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn devices(&self, device: &'static str) -> Result<Devices, String> {
        let dir = tempfile::Builder::new()
            .prefix("rt-bench-dev-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        match device {
            "file" => {
                let fifo = dir.path().join("mic.fifo");
                let conf = dir.path().join("asound.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "pcm.bench_mic {{ type file; slave.pcm \"null\"; file \"/dev/null\"; infile \"{}\"; format \"raw\" }}\n\
                         pcm.bench_speaker {{ type file; slave.pcm \"null\"; file \"/dev/null\"; format \"raw\" }}\n",
                        fifo.display()
                    ),
                )
                .map_err(|e| e.to_string())?;
                let mic = Mic::file(&fifo, "bench_mic")?;
                Ok(Devices {
                    audio: AudioEnv {
                        capture: "bench_mic".into(),
                        walkie_backend: "alsa",
                        walkie_capture: "bench_mic".into(),
                        playback: "bench_speaker".into(),
                        env: vec![(
                            "ALSA_CONFIG_PATH".into(),
                            format!("/usr/share/alsa/alsa.conf:{}", conf.display()),
                        )],
                        clockless: true,
                    },
                    mic,
                    _dir: dir,
                })
            }
            _ => {
                let pulse = self
                    .pulse
                    .as_ref()
                    .ok_or("the pulse device needs PulseAudio (rt-bench/setup.sh)")?;
                let mic = Mic::pulse(&pcm("mic"), &pcm("mic.monitor"), &pcm("mic.monitor"))?;
                Ok(Devices {
                    audio: AudioEnv {
                        capture: mic.device.clone(),
                        walkie_backend: "pulse",
                        walkie_capture: "mic.monitor".into(),
                        playback: pcm("speaker"),
                        env: pulse.client_env(),
                        clockless: false,
                    },
                    mic,
                    _dir: dir,
                })
            }
        }
    }

    fn push(
        &mut self,
        id: &'static str,
        device: Option<&'static str>,
        variant: Option<String>,
        (which, probe): (Impl, bool),
        unit: &'static str,
        dist: &Dist,
    ) {
        if dist.is_empty() {
            self.notes.push(format!(
                "{id} {device:?} {variant:?}: no samples from {}",
                which.name()
            ));
            return;
        }
        let summary = if unit == "ms" {
            dist.summary_ms()
        } else {
            dist.summary_value()
        };
        self.figures.push(Figure {
            id,
            device,
            variant,
            subject: which.name(),
            build: build_of(which, probe),
            unit,
            summary,
        });
    }

    fn start(
        &self,
        which: Impl,
        probe: bool,
        server: &Server,
        dev: &Devices,
    ) -> Result<Subject, String> {
        let mut s = Subject::start(which, probe, &self.programs, server, &dev.audio)?;
        s.wait_ready(Duration::from_secs(30))?;
        s.wait_connected(server)?;
        Ok(s)
    }

    /// Idle (CPU, wake-ups per thread, RSS at rest) and mic→wire with the button held,
    /// on the plain build.
    pub fn audio_plain(&mut self, device: &'static str, which: Impl) -> Result<(), String> {
        let server = Server::start()?;
        let dev = self.devices(device)?;
        let mut s = self.start(which, false, &server, &dev)?;
        std::thread::sleep(self.plan.settle);

        // Idle: the link open, nothing happening.
        let pid = s.pid();
        let mut cpu = Dist::new();
        let mut wake = Dist::new();
        let first = procstat::threads(pid);
        let mut prev = first.clone();
        let mut t_prev = now_ns();
        let end = t_prev + self.plan.idle.as_nanos() as u64;
        let mut tick = t_prev;
        while now_ns() < end {
            tick += 1_000_000_000;
            sleep_until(tick.min(end));
            let cur = procstat::threads(pid);
            let t = now_ns();
            let d = procstat::delta_by_name(&prev, &cur);
            let secs = (t - t_prev) as f64 / 1e9;
            let cpu_ns: u64 = d.values().map(|x| x.cpu_ns).sum();
            let woke: u64 = d.values().map(|x| x.voluntary).sum();
            cpu.record_value(cpu_ns as f64 / 1e9 / secs * 100.0);
            wake.record_value(woke as f64 / secs);
            prev = cur;
            t_prev = t;
        }
        let total = procstat::delta_by_name(&first, &prev);
        let window = self.plan.idle.as_secs_f64();
        let threads: Vec<serde_json::Value> = total
            .values()
            .map(|t| {
                json!({"thread": t.name, "cpu_percent": t.cpu_ns as f64 / 1e9 / window * 100.0,
                       "wakeups_per_s": t.voluntary as f64 / window,
                       "preempted_per_s": t.involuntary as f64 / window})
            })
            .collect();
        self.idle_threads
            .push(json!({"subject": which.name(), "device": device,
            "build": build_of(which, false), "seconds": window, "threads": threads}));
        let rss = procstat::rss_kib(pid) as f64 / 1024.0;
        let mut rss_d = Dist::new();
        rss_d.record_value(rss);
        self.push("idle_cpu", Some(device), None, (which, false), "%", &cpu);
        self.push(
            "idle_wakeups",
            Some(device),
            None,
            (which, false),
            "/s",
            &wake,
        );
        self.push(
            "rss_rest",
            Some(device),
            None,
            (which, false),
            "MiB",
            &rss_d,
        );

        // mic→wire: the button held, live audio streaming.
        server.clear_inbox();
        let pressed = s.key(true)?;
        std::thread::sleep(self.plan.hold);
        s.key(false)?;
        // The turn's audio is all in once its commit is: a subject starved on a busy
        // machine can send the hold's appends well after the release.
        let end = Instant::now() + Duration::from_secs(10);
        while server
            .first_event("input_audio_buffer.commit", pressed)
            .is_none()
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let d = mic_wire(&server, &dev.mic, pressed + 200_000_000);
        self.push("mic_wire", Some(device), None, (which, false), "ms", &d);
        let (_, _, log) = s.stop(Duration::from_secs(10));
        if d.is_empty() {
            self.notes.push(format!(
                "{} log:\n{}",
                which.name(),
                crate::subject::tail(&log)
            ));
        }
        Ok(())
    }

    /// wire→ring, wire→device and barge-in, on the probe build.
    pub fn audio_probe(&mut self, device: &'static str, which: Impl) -> Result<(), String> {
        let server = Server::start()?;
        let dev = self.devices(device)?;
        let mut s = self.start(which, true, &server, &dev)?;
        std::thread::sleep(self.plan.settle);

        // Answers of 0.4 s in deltas of 40 ms, four times faster than they play, with the
        // speaker idle in between.
        let mut reports: Vec<(u64, SpeakReport)> = Vec::new();
        let mut offset = 0u64;
        for _ in 0..self.plan.responses {
            let rx = server.speak(tone(9600), 960, Duration::from_millis(10));
            let report = rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| "the server never finished a response")?;
            let total = report.deltas.last().map_or(0, |d| d.1);
            reports.push((offset, report));
            offset += total;
            std::thread::sleep(Duration::from_millis(700));
        }

        let answers_end = now_ns();
        // Barge-ins: press while a 2 s answer plays.
        let mut presses = Vec::new();
        for _ in 0..self.plan.barge_ins {
            let rx = server.speak(tone(48_000), 2400, Duration::from_millis(25));
            std::thread::sleep(Duration::from_millis(400));
            let t = s.key(true)?;
            presses.push(t);
            std::thread::sleep(Duration::from_millis(200));
            s.key(false)?;
            let _ = rx.recv_timeout(Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(400));
        }
        let cancels: Vec<Option<u64>> = presses
            .iter()
            .map(|&t| server.first_event("response.cancel", t))
            .collect();
        let (_, probe, log) = s.stop(Duration::from_secs(10));

        let (ring, devw) = playback_latencies(&probe, &reports);
        if let Some(note) = ring_shortfall(&probe, &reports, answers_end) {
            self.notes
                .push(format!("wire→ring {device} {}: {note}", which.name()));
        }
        let mut barge = Dist::new();
        let mut cancel = Dist::new();
        let mut no_cancel = 0;
        let flushes = probe.get("flush").cloned().unwrap_or_default();
        for (i, &t) in presses.iter().enumerate() {
            let next = presses.get(i + 1).copied().unwrap_or(u64::MAX);
            if let Some(f) = flushes.iter().find(|f| f.t_ns >= t && f.t_ns < next) {
                barge.record_ns(f.t_ns - t);
            }
            // A press that found the answer already sent in full is answered with a
            // truncation alone: the next press's cancel is not this one's.
            match cancels[i] {
                Some(c) if c < next => cancel.record_ns(c - t),
                _ => no_cancel += 1,
            }
        }
        if no_cancel > 0 {
            self.notes.push(format!(
                "barge-in {device} {}: {no_cancel} of {} presses sent no response.cancel before the next press",
                which.name(),
                presses.len()
            ));
        }
        self.push("wire_ring", Some(device), None, (which, true), "ms", &ring);
        self.push(
            "wire_device",
            Some(device),
            None,
            (which, true),
            "ms",
            &devw,
        );
        self.push("barge_in", Some(device), None, (which, true), "ms", &barge);
        self.push(
            "barge_cancel",
            Some(device),
            None,
            (which, true),
            "ms",
            &cancel,
        );
        if ring.is_empty() || barge.is_empty() {
            self.notes.push(format!(
                "{} log:\n{}",
                which.name(),
                crate::subject::tail(&log)
            ));
        }
        Ok(())
    }

    /// Tool calls: `start_task` (a spawn) and `list_tasks`.
    pub fn tool_ack(&mut self, which: Impl) -> Result<(), String> {
        let server = Server::start()?;
        let dev = self.devices("file")?;
        let s = self.start(which, false, &server, &dev)?;
        std::thread::sleep(self.plan.settle);
        let spawn = calls(&server, "start_task", self.plan.tool_calls, "t");
        let list = calls(&server, "list_tasks", self.plan.tool_calls, "l");
        self.push(
            "tool_ack",
            None,
            Some("start_task (spawn)".into()),
            (which, false),
            "ms",
            &spawn,
        );
        self.push(
            "tool_ack",
            None,
            Some("list_tasks".into()),
            (which, false),
            "ms",
            &list,
        );
        let (_, _, log) = s.stop(Duration::from_secs(10));
        if spawn.is_empty() {
            self.notes.push(format!(
                "{} log:\n{}",
                which.name(),
                crate::subject::tail(&log)
            ));
        }
        Ok(())
    }

    /// N agents each flooding 5 MB/s while audio flows both ways: the longest loop
    /// iterations (probe), the control round trip, mic→wire, and at N=10 tool calls.
    pub fn load(&mut self, which: Impl, n: usize) -> Result<(), String> {
        let server = Server::start()?;
        let dev = self.devices("file")?;
        let mut s = self.start(which, true, &server, &dev)?;
        s.start_tasks(n, "flood @flood-rate=5M")?;
        let end = now_ns() + 20_000_000_000;
        while s.running_tasks() < n as u64 && now_ns() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(self.plan.settle);
        let variant = Some(format!("N={n}"));
        server.clear_inbox();
        // Audio both ways: the button held (appends) and an answer playing in real time.
        let window = self.plan.load_window;
        let speech = (window.as_millis() as usize + 500) * 24;
        let rx = server.speak(tone(speech), 2400, Duration::from_millis(100));
        let pressed = s.key(true)?;
        let from = now_ns();
        let end = from + window.as_nanos() as u64;
        let mut rtt = Dist::new();
        let mut next = from;
        while now_ns() < end {
            match s.status_rtt() {
                Ok(ns) => rtt.record_ns(ns),
                Err(e) => return Err(format!("{}: control socket: {e}", which.name())),
            }
            next += 20_000_000;
            sleep_until(next);
        }
        let until = now_ns();
        s.key(false)?;
        let _ = rx.recv_timeout(Duration::from_secs(10));
        let mic = mic_wire(&server, &dev.mic, pressed + 200_000_000);
        let mut flood_calls = None;
        if n == 10 {
            std::thread::sleep(Duration::from_millis(300));
            flood_calls = Some(calls(&server, "start_task", self.plan.load_tool_calls, "f"));
        }
        let (_, probe, log) = s.stop(Duration::from_secs(15));
        let mut stall = Dist::new();
        let mut on_cpu = Dist::new();
        // `iter` records stamp the end of an iteration; keep those inside the window.
        // `b` is the part of it the loop's thread spent on a CPU (not preempted).
        for r in probe.get("iter").into_iter().flatten() {
            if r.t_ns >= from && r.t_ns <= until {
                stall.record_ns(r.a);
                on_cpu.record_ns(r.b);
            }
        }
        self.push(
            "loop_stall",
            None,
            variant.clone(),
            (which, true),
            "ms",
            &stall,
        );
        self.push(
            "loop_cpu",
            None,
            variant.clone(),
            (which, true),
            "ms",
            &on_cpu,
        );
        self.push("ctl_rtt", None, variant.clone(), (which, true), "ms", &rtt);
        self.push(
            "mic_wire_load",
            Some("file"),
            variant,
            (which, true),
            "ms",
            &mic,
        );
        if let Some(d) = flood_calls {
            self.push(
                "tool_ack",
                None,
                Some("start_task under 10-agent flood".into()),
                (which, true),
                "ms",
                &d,
            );
        }
        if stall.is_empty() {
            self.notes.push(format!(
                "{} log:\n{}",
                which.name(),
                crate::subject::tail(&log)
            ));
        }
        Ok(())
    }

    /// Both subjects side by side at ten times the normal event rate: a turn every 6 s
    /// (1.5 s held, a 2 s answer), a task every 12 s (200 KB of output), a status request
    /// every second; RSS sampled every second.
    pub fn soak(&mut self, subjects: &[Impl]) -> Result<(), String> {
        struct Run {
            which: Impl,
            server: Server,
            _dev: Devices,
            s: Subject,
            rss: Vec<(f64, f64)>,
            calls: u64,
        }
        let mut runs = Vec::new();
        for &which in subjects {
            let server = Server::start()?;
            server.auto_reply(AutoReply::Speak(2000));
            let dev = self.devices("file")?;
            let s = self.start(which, false, &server, &dev)?;
            runs.push(Run {
                which,
                server,
                _dev: dev,
                s,
                rss: Vec::new(),
                calls: 0,
            });
        }
        std::thread::sleep(self.plan.settle);
        let start = now_ns();
        let secs = self.plan.soak.as_secs().max(1);
        for sec in 0..secs {
            sleep_until(start + sec * 1_000_000_000);
            for r in runs.iter_mut() {
                let pid = r.s.pid();
                r.rss
                    .push((sec as f64, procstat::rss_kib(pid) as f64 / 1024.0));
                let _ = r.s.request(&json!({"cmd": "status"}));
                if sec % 6 == 0 {
                    let _ = r.s.key(true);
                }
                if sec % 12 == 5 {
                    r.calls += 1;
                    let id = format!("soak_{}", r.calls);
                    let _ = r
                        .server
                        .call("start_task", json!({"prompt": "soak @flood=200K"}), &id);
                }
            }
            // The release, 1.5 s after the press.
            if sec % 6 == 1 {
                sleep_until(start + sec * 1_000_000_000 + 500_000_000);
                for r in runs.iter_mut() {
                    let _ = r.s.key(false);
                }
            }
        }
        for r in runs {
            let mut d = Dist::new();
            for &(_, v) in &r.rss {
                d.record_value(v);
            }
            self.push("rss_soak", None, None, (r.which, false), "MiB", &d);
            // Growth over the second half, by least squares (the first half warms up).
            let half: Vec<(f64, f64)> = r.rss[r.rss.len() / 2..].to_vec();
            let slope = slope_per_min(&half) * 1024.0;
            let mut sd = Dist::new();
            sd.record_value(slope.max(0.0) + 1e-6);
            self.push("rss_slope", None, None, (r.which, false), "KiB/min", &sd);
            let _ = r.s.stop(Duration::from_secs(15));
        }
        Ok(())
    }

    /// Process start → control socket answering.
    pub fn ready(&mut self, which: Impl) -> Result<(), String> {
        let server = Server::start()?;
        let mut d = Dist::new();
        for _ in 0..self.plan.starts {
            let dev = self.devices("file")?;
            let mut s = Subject::start(which, false, &self.programs, &server, &dev.audio)?;
            let ready = s.wait_ready(Duration::from_secs(30))?;
            d.record_ns(ready - s.spawned_ns);
            let _ = s.wait_connected(&server);
            let _ = s.stop(Duration::from_secs(10));
        }
        self.push("ready", None, None, (which, false), "ms", &d);
        Ok(())
    }

    /// SIGTERM with 10 agents running → exit.
    pub fn shutdown(&mut self, which: Impl) -> Result<(), String> {
        let server = Server::start()?;
        let mut d = Dist::new();
        for _ in 0..self.plan.shutdowns {
            let dev = self.devices("file")?;
            let s = self.start(which, false, &server, &dev)?;
            s.start_tasks(10, "wait @stall")?;
            let end = now_ns() + 20_000_000_000;
            while s.running_tasks() < 10 && now_ns() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Let the agents print their first lines and settle.
            std::thread::sleep(Duration::from_millis(300));
            let t0 = now_ns();
            let (exited, _, log) = s.stop(Duration::from_secs(20));
            match exited {
                Some(t) => d.record_ns(t - t0),
                None => self.notes.push(format!(
                    "{} did not exit within 20 s of SIGTERM:\n{}",
                    which.name(),
                    crate::subject::tail(&log)
                )),
            }
        }
        self.push(
            "shutdown",
            None,
            Some("10 agents".into()),
            (which, false),
            "ms",
            &d,
        );
        Ok(())
    }
}

/// `count` calls of tool `name`, one after the other; arguments.done → output, in ns.
fn calls(server: &Server, name: &str, count: usize, tag: &str) -> Dist {
    let mut d = Dist::new();
    for i in 0..count {
        let id = format!("call_{tag}{i}");
        let args = if name == "start_task" {
            json!({"prompt": "quick job @sleep=0.05", "name": format!("job-{tag}{i}")})
        } else {
            json!({})
        };
        let Some(sent) = server.call(name, args, &id) else {
            continue;
        };
        let end = now_ns() + 5_000_000_000;
        loop {
            if let Some(t) = server.output_time(&id) {
                d.record_ns(t.saturating_sub(sent));
                break;
            }
            if now_ns() > end {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

/// mic→wire for every append after `from` that ends a period: the append's arrival minus
/// the instant that period became available.
fn mic_wire(server: &Server, mic: &Mic, from: u64) -> Dist {
    let mut d = Dist::new();
    let appends = server.inbox.lock().expect("inbox").appends.clone();
    for a in appends.iter().filter(|a| a.t_ns >= from) {
        // The newest period the microphone had delivered when the append arrived, plus
        // slack: the subject's copy may beat the bench's own listener by a little.
        let latest = mic.latest_at(a.t_ns) + 50;
        let Some(idx) = untag(a.last, latest) else {
            continue;
        };
        // On the pulse device the bench's listener is a pulse client too, woken by its
        // own libpulse thread: now and then the subject's copy wins by a fraction of a
        // millisecond. Such a sample counts as 0 (nothing measurable), not as missing.
        if let Some(t) = mic.available_sample(idx) {
            d.record_ns(a.t_ns.saturating_sub(t));
        }
    }
    d
}

/// wire→ring for every delta, wire→device for the first delta of each answer (the speaker
/// idle before it), from the probe's `ring` and `dev` records.
fn playback_latencies(probe: &Probe, reports: &[(u64, SpeakReport)]) -> (Dist, Dist) {
    let mut ring = Dist::new();
    let mut dev = Dist::new();
    let rings = probe.get("ring").cloned().unwrap_or_default();
    let devs = probe.get("dev").cloned().unwrap_or_default();
    for (offset, report) in reports {
        for (i, &(sent, end)) in report.deltas.iter().enumerate() {
            let total = offset + end;
            if let Some(r) = rings.iter().find(|r| r.a >= total && r.t_ns >= sent) {
                ring.record_ns(r.t_ns - sent);
            }
            if i == 0
                && let Some(r) = devs.iter().find(|r| r.a > *offset && r.t_ns >= sent)
            {
                dev.record_ns(r.t_ns - sent);
            }
        }
    }
    (ring, dev)
}

/// Whether every answer's samples were all in the playback ring before the next answer
/// began. wire→ring pairs each delta with the first push that brings the ring's running
/// count to the delta's, so samples missing from one answer would pair its last deltas
/// with the next answer's pushes (a "latency" of the pause between answers): this names
/// the answers where the count fell short, so such an outlier is not read as a late loop.
fn ring_shortfall(
    probe: &Probe,
    reports: &[(u64, SpeakReport)],
    answers_end: u64,
) -> Option<String> {
    let rings = probe.get("ring").map(Vec::as_slice).unwrap_or_default();
    let mut short = Vec::new();
    for (k, (offset, report)) in reports.iter().enumerate() {
        let expected = offset + report.deltas.last().map_or(0, |d| d.1);
        let next = reports
            .get(k + 1)
            .and_then(|(_, r)| r.deltas.first())
            .map_or(answers_end, |d| d.0);
        let pushed = rings
            .iter()
            .filter(|r| r.t_ns < next)
            .map(|r| r.a)
            .max()
            .unwrap_or(0);
        if pushed != expected {
            short.push(format!("answer {}: {pushed} of {expected}", k + 1));
        }
    }
    (!short.is_empty()).then(|| {
        format!(
            "the ring's sample count before the next answer differs from what was sent ({})",
            short.join(", ")
        )
    })
}

/// Least-squares slope of (seconds, MiB) points, in MiB per minute.
fn slope_per_min(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), p| (a + p.0, b + p.1));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), p| {
        (a + (p.0 - mx) * (p.1 - my), b + (p.0 - mx) * (p.0 - mx))
    });
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject::ProbeRec;

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..60)
            .map(|s| (s as f64, 10.0 + s as f64 / 60.0))
            .collect();
        assert!((slope_per_min(&pts) - 1.0).abs() < 1e-9);
        assert_eq!(slope_per_min(&[(0.0, 1.0)]), 0.0);
    }

    fn rec(t_ns: u64, a: u64) -> ProbeRec {
        ProbeRec { t_ns, a, b: 0 }
    }

    #[test]
    fn a_ring_short_of_an_answer_is_named() {
        // Two answers of 960 samples in two deltas each, sent at 0/10 and 1000/1010.
        let report = |t: u64| SpeakReport {
            deltas: vec![(t, 480), (t + 10, 960)],
            cancelled: false,
        };
        let reports = vec![(0, report(0)), (960, report(1000))];
        let whole: Probe = [(
            "ring".to_string(),
            vec![rec(5, 480), rec(15, 960), rec(1005, 1440), rec(1015, 1920)],
        )]
        .into();
        assert_eq!(ring_shortfall(&whole, &reports, 2000), None);
        // The first answer's second delta never reached the ring.
        let short: Probe = [(
            "ring".to_string(),
            vec![rec(5, 480), rec(1005, 960), rec(1015, 1440)],
        )]
        .into();
        let note = ring_shortfall(&short, &reports, 2000).unwrap();
        assert!(
            note.contains("answer 1: 480 of 960") && note.contains("answer 2: 1440 of 1920"),
            "{note}"
        );
        // What is pushed after the answers (the barge-in phase) is not counted.
        let mut later = whole.clone();
        later.get_mut("ring").unwrap().push(rec(3000, 5000));
        assert_eq!(ring_shortfall(&later, &reports, 2000), None);
    }
}
