//! The voice loop through the real binary: ALSA plugin devices (file-backed PCMs,
//! docs/ARCHITECTURE.md, "Testing without hardware"), a FIFO of `input_event` records as the
//! button, fake-realtime as the model.

mod common;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use walkie::voice::Earcon;

const T: Duration = Duration::from_secs(30);
const KEY_F13: u16 = 183;

/// The microphone's input: 30 s of a counting pattern with no zero, so the received audio
/// can be checked for order and gaps sample by sample.
const PATTERN_PERIOD: i32 = 30_011;
fn mic_sample(n: usize) -> i16 {
    ((n as i32 % PATTERN_PERIOD) - 15_005
        + if n as i32 % PATTERN_PERIOD >= 15_005 {
            1
        } else {
            0
        }) as i16
}

/// A distinctive "speech" the fake model answers with (no zero, no repeat within it).
fn speech(frames: usize) -> Vec<i16> {
    (0..frames)
        .map(|i| -(((i * 13) % 15_000) as i16) - 1)
        .collect()
}

fn write_wav(path: &Path, samples: &[i16]) {
    let mut f = File::create(path).unwrap();
    let data = (samples.len() * 2) as u32;
    f.write_all(b"RIFF").unwrap();
    f.write_all(&(36 + data).to_le_bytes()).unwrap();
    f.write_all(b"WAVEfmt ").unwrap();
    f.write_all(&16u32.to_le_bytes()).unwrap();
    f.write_all(&1u16.to_le_bytes()).unwrap();
    f.write_all(&1u16.to_le_bytes()).unwrap();
    f.write_all(&24_000u32.to_le_bytes()).unwrap();
    f.write_all(&48_000u32.to_le_bytes()).unwrap();
    f.write_all(&2u16.to_le_bytes()).unwrap();
    f.write_all(&16u16.to_le_bytes()).unwrap();
    f.write_all(b"data").unwrap();
    f.write_all(&data.to_le_bytes()).unwrap();
    for s in samples {
        f.write_all(&s.to_le_bytes()).unwrap();
    }
}

fn read_raw(path: &Path) -> Vec<i16> {
    std::fs::read(path)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The button: a FIFO walkie reads `struct input_event` records from.
struct Fifo {
    path: PathBuf,
    writer: Option<File>,
}

impl Fifo {
    fn create(path: PathBuf) -> Fifo {
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        Fifo { path, writer: None }
    }

    fn open(&mut self) {
        // Blocks until walkie has the FIFO open for reading.
        self.writer = Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&self.path)
                .unwrap(),
        );
    }

    fn record(&mut self, kind: u16, code: u16, value: i32) {
        let mut rec = [0u8; 24];
        rec[16..18].copy_from_slice(&kind.to_le_bytes());
        rec[18..20].copy_from_slice(&code.to_le_bytes());
        rec[20..24].copy_from_slice(&value.to_le_bytes());
        self.writer.as_mut().expect("open").write_all(&rec).unwrap();
    }

    fn key(&mut self, value: i32) {
        self.record(1, KEY_F13, value);
        self.record(0, 0, 0); // SYN_REPORT
    }
}

struct Rig {
    w: Walkie,
    fake: FakeRealtime,
    button: Fifo,
}

/// walkie on ALSA file devices with a FIFO button, connected to fake-realtime whose every
/// answer is `reply_frames` of [`speech`].
fn rig(reply_frames: usize, earcons: bool, fake_args: &[&str], audio_extra: &str) -> Rig {
    let mut w = Walkie::new();
    let dir = w.dir.path().to_path_buf();
    let input: Vec<u8> = (0..24_000 * 30)
        .flat_map(|n| mic_sample(n).to_le_bytes())
        .collect();
    std::fs::write(dir.join("input.raw"), input).unwrap();
    w.use_test_alsa();
    write_wav(&dir.join("reply.wav"), &speech(reply_frames));
    let script = json!({
        "default": {"say": "Here is my answer.", "wav": "reply.wav"},
        "on_system": {"say": "A task finished.", "wav": "reply.wav"},
        "after_tool": {"say": "Started.", "wav": "reply.wav"},
        "transcript": "please fix the flaky test"
    });
    std::fs::write(dir.join("script.json"), script.to_string()).unwrap();
    let mut args = vec![
        "--script",
        dir.join("script.json").to_str().unwrap().to_string().leak() as &str,
    ];
    args.extend_from_slice(fake_args);
    let fake = FakeRealtime::start(&dir, &args);
    let button = Fifo::create(dir.join("button"));
    let config = w.realtime_config(&fake, "", "").replace(
        "[audio]\nbackend = \"none\"\n[button]\ndevice = \"none\"\n",
        &format!(
            "[audio]\nbackend = \"alsa\"\ncapture_device = \"walkie_capture\"\nplayback_device = \"walkie_speaker\"\nearcons = {earcons}\n{audio_extra}\n[button]\ndevice = \"{}\"\n",
            dir.join("button").display()
        ),
    );
    w.write_config(&config);
    w.start_with(&["--trace", dir.join("trace.jsonl").to_str().unwrap()]);
    w.wait_connected();
    Rig { w, fake, button }
}

impl Rig {
    fn speaker(&self) -> Vec<i16> {
        read_raw(&self.w.path("speaker.raw"))
    }

    /// Stops walkie (the speaker file is complete only once the stream is closed).
    fn stop(&mut self) {
        self.w.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(self.w.wait_exit(T), Some(0), "{}", self.w.log());
    }

    fn appended_audio(&self) -> Vec<i16> {
        crate::common::appended_samples(&self.fake)
    }
}

/// Waits until the model has answered `answers` times and walkie has played it all out:
/// the answers are in the transcript, no response is active and the speaker has taken
/// every queued frame. (A fixed sleep is too short on a starved machine; the speaker file
/// holds only what was played before the stop.)
fn wait_answers_played(w: &Walkie, answers: usize) {
    let (mut said, mut st) = (0, Value::Null);
    let ok = wait_until(T, || {
        said = w
            .ctl_json(&["transcript"])
            .as_array()
            .map_or(0, |t| t.iter().filter(|e| e["role"] == "assistant").count());
        st = w.ctl_json(&["status"]);
        said >= answers
            && st["conversation"]["active_response"].is_null()
            && st["conversation"]["playing"] == false
    });
    assert!(
        ok,
        "{said} of {answers} answer(s) played: {st}\n{}",
        w.log()
    );
}

/// Where `needle` starts in `hay`.
fn find(hay: &[i16], needle: &[i16]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn a_spoken_turn_reaches_the_model_whole_and_the_answer_reaches_the_speaker() {
    let mut r = rig(24_000, false, &[], "");
    std::thread::sleep(Duration::from_millis(800)); // let the pre-roll window fill
    r.button.open();
    let pressed = Instant::now();
    r.button.key(1);
    std::thread::sleep(Duration::from_millis(700));
    // What this thread actually held (a starved machine oversleeps), not what it asked.
    let held = pressed.elapsed().as_millis() as usize;
    r.button.key(0);
    r.fake.wait_events(T, "commit + response.create", |ev| {
        let t: Vec<&str> = ev
            .iter()
            .map(|(_, e)| e["type"].as_str().unwrap())
            .collect();
        t.iter()
            .position(|x| *x == "input_audio_buffer.commit")
            .is_some_and(|c| t[c..].contains(&"response.create"))
    });
    let audio = r.appended_audio();
    // In order and nothing dropped: every sample follows the one before in the pattern.
    let first = audio.first().copied().expect("audio was sent");
    let start = (0..PATTERN_PERIOD as usize)
        .find(|&n| mic_sample(n) == first)
        .unwrap();
    for (i, s) in audio.iter().enumerate() {
        assert_eq!(
            *s,
            mic_sample(start + i),
            "sample {i} of {} is out of sequence",
            audio.len()
        );
    }
    // Pre-roll (300 ms) plus the time held, give or take scheduling.
    let ms = audio.len() / 24;
    assert!(
        (300 + held - 100..=300 + held + 250).contains(&ms),
        "{ms} ms of audio sent for a 300 ms pre-roll and {held} ms held"
    );
    // The turn went out as: clear at the press, appends, commit, response.create.
    let types: Vec<String> = r
        .fake
        .events()
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap().to_string())
        .collect();
    let clear = types
        .iter()
        .position(|t| t == "input_audio_buffer.clear")
        .unwrap();
    let append = types
        .iter()
        .position(|t| t == "input_audio_buffer.append")
        .unwrap();
    assert!(clear < append);
    // The answer (1 s of speech) plays; the user's transcript is recorded.
    assert!(wait_until(T, || r
        .w
        .ctl_json(&["transcript"])
        .to_string()
        .contains("please fix the flaky test")));
    wait_answers_played(&r.w, 1);
    r.stop();
    let out = r.speaker();
    let reply = speech(24_000);
    let at = find(&out, &reply[..2400]).expect("the answer is in the speaker output");
    let differs = out[at..].iter().zip(&reply).position(|(a, b)| a != b);
    assert!(
        differs.is_none() && out.len() >= at + reply.len(),
        "the whole answer, unaltered: {} of {} samples played, first difference at {differs:?}: \
         played {:?}, answer {:?}",
        out.len() - at,
        reply.len(),
        differs.map(|d| &out[at + d.saturating_sub(4)..(at + d + 8).min(out.len())]),
        differs.map(|d| &reply[d.saturating_sub(4)..(d + 8).min(reply.len())]),
    );
    check_trace_with_sdk(&r.w.path("trace.jsonl"));
}

#[test]
fn a_tap_shorter_than_100_ms_is_cleared_not_committed() {
    let r = &mut rig(2400, false, &[], "");
    r.button.open();
    r.button.key(1);
    std::thread::sleep(Duration::from_millis(30));
    r.button.key(0);
    r.fake.wait_events(T, "two clears", |ev| {
        ev.iter()
            .filter(|(_, e)| e["type"] == "input_audio_buffer.clear")
            .count()
            == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        r.fake
            .events_of_type("input_audio_buffer.commit")
            .is_empty()
    );
    assert!(r.fake.events_of_type("response.create").is_empty());
}

#[test]
fn key_repeats_and_syn_dropped_do_not_make_extra_turns() {
    let r = &mut rig(2400, false, &[], "");
    r.button.open();
    r.button.key(1);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(40));
        r.button.key(2); // autorepeat
    }
    std::thread::sleep(Duration::from_millis(100));
    r.button.key(0);
    r.fake.wait_events(T, "one commit", |ev| {
        ev.iter()
            .any(|(_, e)| e["type"] == "input_audio_buffer.commit")
    });
    // A press whose release was lost in a SYN_DROPPED: the resync (a FIFO has no key state
    // to ask) ends the turn.
    r.button.key(1);
    std::thread::sleep(Duration::from_millis(300));
    r.button.record(0, 3, 0); // SYN_DROPPED
    r.button.record(1, KEY_F13, 0); // lost
    r.button.record(0, 0, 0); // SYN_REPORT
    r.fake.wait_events(T, "the second turn ends", |ev| {
        ev.iter()
            .filter(|(_, e)| e["type"] == "input_audio_buffer.commit")
            .count()
            == 2
    });
    std::thread::sleep(Duration::from_millis(300));
    let clears = r.fake.events_of_type("input_audio_buffer.clear").len();
    assert_eq!(clears, 2, "one clear per press, none for the repeats");
    assert_eq!(r.w.ctl_json(&["status"])["button"]["pressed"], false);
}

#[test]
fn barge_in_silences_playback_cancels_and_truncates_to_what_was_heard() {
    // Streaming at twice real time keeps the 6 s response active for 3 s while it plays.
    let mut r = rig(6 * 24_000, false, &["--speed", "2"], "");
    r.w.ctl(&["say", "tell me everything"]);
    r.fake.wait_events(T, "the response", |ev| {
        ev.iter().any(|(_, e)| e["type"] == "response.create")
    });
    assert!(wait_until(T, || r.w.ctl_json(&["status"])["conversation"]
        ["playing"]
        == true));
    std::thread::sleep(Duration::from_millis(1500));
    r.button.open();
    r.button.key(1);
    r.fake.wait_events(T, "cancel and truncate", |ev| {
        ev.iter().any(|(_, e)| e["type"] == "response.cancel")
            && ev
                .iter()
                .any(|(_, e)| e["type"] == "conversation.item.truncate")
    });
    std::thread::sleep(Duration::from_millis(300));
    r.button.key(0);
    std::thread::sleep(Duration::from_millis(500));
    // The pre-roll dropped what the microphone heard while the answer played (no echo):
    // about the 300 ms held went out, not 300 ms of pre-roll more.
    let sent_ms = r.appended_audio().len() / 24;
    assert!(
        sent_ms < 480,
        "{sent_ms} ms sent: the echo was in the pre-roll"
    );
    let truncate = r
        .fake
        .events_of_type("conversation.item.truncate")
        .remove(0);
    let end_ms = truncate["audio_end_ms"].as_u64().unwrap();
    // The fake records an event before it handles it, and publishes its state after.
    let mut st = Value::Null;
    assert!(wait_until(T, || {
        st = r.fake.state();
        !st["truncations"][0].is_null()
    }));
    assert_eq!(
        st["truncations"][0]["audio_end_ms"], end_ms,
        "the server accepted it: {st}"
    );
    r.stop();
    // What reached the speaker: the answer from its start, cut where the truncate says.
    let out = r.speaker();
    let reply = speech(6 * 24_000);
    let at = find(&out, &reply[..2400]).expect("the answer started playing");
    // Count the answer's samples in order; a zero is a gap of silence (the pattern has none).
    let mut played = 0;
    let mut end = at;
    for (i, s) in out[at..].iter().enumerate() {
        if *s == 0 {
            continue;
        }
        if played < reply.len() && *s == reply[played] {
            played += 1;
            end = at + i + 1;
        } else {
            break;
        }
    }
    let played_ms = played as i64 / 24;
    assert!((1000..5500).contains(&played_ms), "played {played_ms} ms");
    assert!(
        (end_ms as i64 - played_ms).abs() <= 60,
        "truncate says {end_ms} ms, the speaker played {played_ms} ms"
    );
    // Nothing of the answer after the cut: silence, then (the release, 300 ms after the
    // press, commits a new turn that is answered again) the next answer from its start.
    // The speaker is stopped while nothing plays, so the file holds no idle time.
    let next = out[end..]
        .iter()
        .position(|s| *s != 0)
        .map_or(out.len(), |i| end + i);
    assert!(next >= end + 240, "speech went on after the barge-in");
    if next < out.len() {
        assert!(
            out[next..].starts_with(&reply[..2400.min(out.len() - next)]),
            "what followed the cut is not the next answer from its start"
        );
    }
    check_trace_with_sdk(&r.w.path("trace.jsonl"));
}

#[test]
fn earcons_play_when_enabled_and_not_when_disabled() {
    for enabled in [true, false] {
        let mut r = rig(2400, enabled, &[], "");
        // Answers start with a second of silence, so the release earcon is not mixed with speech.
        let mut quiet = vec![0i16; 24_000];
        quiet.extend(speech(2400));
        let quiet_wav = r.w.path("quiet.wav");
        write_wav(&quiet_wav, &quiet);
        let reply = json!({"say": "ok", "wav": quiet_wav});
        assert_eq!(
            r.fake
                .control(json!({"cmd": "script", "default": reply, "on_system": reply}))["ok"],
            true
        );
        std::thread::sleep(Duration::from_millis(300));
        r.w.ctl(&["press"]);
        std::thread::sleep(Duration::from_millis(600));
        r.w.ctl(&["release"]);
        // The answer plays out first: the chime must not be mixed with its speech.
        wait_answers_played(&r.w, 1);
        // A finished task's chime, before its announcement.
        let name = r.w.start_task(&["@sleep=0"]);
        r.w.wait_finished(&name, T);
        r.fake.wait_events(T, "the announcement", |ev| {
            ev.iter().any(|(_, e)| e["item"]["role"] == "system")
        });
        // The chime went to the speaker before the announcement; its answer plays after.
        wait_answers_played(&r.w, 2);
        r.stop();
        let out = r.speaker();
        for e in [Earcon::Press, Earcon::Release, Earcon::TaskDone] {
            let sound = walkie::audio::earcon::generate(e);
            let found = find(&out, &sound[..sound.len().min(1200)]).is_some();
            assert_eq!(found, enabled, "{e:?} earcon with earcons = {enabled}");
        }
        if !enabled {
            let speech = speech(2400);
            let at = find(&out, &speech[..1200]).expect("the answer still plays");
            assert!(
                out[..at].iter().all(|s| *s == 0),
                "only silence before the answer"
            );
        }
    }
}

#[test]
fn the_button_fifo_closing_and_reappearing_is_reopened() {
    let r = &mut rig(2400, false, &[], "");
    r.button.open();
    r.button.key(1);
    std::thread::sleep(Duration::from_millis(200));
    r.button.key(0);
    r.fake.wait_events(T, "the first turn", |ev| {
        ev.iter()
            .any(|(_, e)| e["type"] == "input_audio_buffer.commit")
    });
    // The writer goes away and the FIFO is deleted and made again (a udev-style re-creation).
    r.button.writer = None;
    std::fs::remove_file(&r.button.path).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut again = Fifo::create(r.button.path.clone());
    again.open();
    again.key(1);
    std::thread::sleep(Duration::from_millis(200));
    again.key(0);
    r.fake.wait_events(T, "a turn through the new FIFO", |ev| {
        ev.iter()
            .filter(|(_, e)| e["type"] == "input_audio_buffer.commit")
            .count()
            == 2
    });
    assert_eq!(r.w.ctl_json(&["status"])["button"]["state"], "ok");
}

#[test]
fn a_fifo_as_the_wav_microphone_or_speaker_is_refused_and_the_rest_works() {
    let mut w = Walkie::new();
    let dir = w.dir.path().to_owned();
    let (mic, speaker) = (dir.join("mic.wav"), dir.join("out.wav"));
    for fifo in [&mic, &speaker] {
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }
    w.write_config(&w.default_config("").replace(
        "[audio]\nbackend = \"none\"\n",
        &format!(
            "[audio]\nbackend = \"wav\"\ninput_wav = \"{}\"\noutput_wav = \"{}\"\n",
            mic.display(),
            speaker.display()
        ),
    ));
    w.start();
    let mut st = Value::Null;
    // Opening either FIFO would have blocked its audio thread for good.
    assert!(
        wait_until(T, || {
            st = w.ctl_json(&["status"]);
            st["audio"]["capture"]["state"] == "failed"
                && st["audio"]["playback"]["state"] == "failed"
        }),
        "{st}"
    );
    let (_, out, _) = w.ctl(&["status"]);
    assert!(out.contains("mic.wav") && out.contains("FIFO"), "{out}");
    let name = w.start_task(&["@sleep=0.2"]);
    assert_eq!(w.wait_finished(&name, T)["state"], "succeeded");
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        w.wait_exit(T),
        Some(0),
        "walkie stops on SIGTERM: {}",
        w.log()
    );
}

#[test]
fn a_capture_device_that_fails_leaves_everything_else_working() {
    let mut w = Walkie::new();
    w.use_test_alsa();
    w.write_config(&w.default_config("").replace(
        "[audio]\nbackend = \"none\"\n",
        "[audio]\nbackend = \"alsa\"\ncapture_device = \"walkie_missing\"\nplayback_device = \"walkie_speaker\"\n",
    ));
    w.start();
    let mut st = Value::Null;
    assert!(
        wait_until(T, || {
            st = w.ctl_json(&["status"]);
            // The playback thread opens its device on its own time: wait for both.
            st["audio"]["capture"]["state"] == "failed"
                && st["audio"]["playback"]["state"] != "opening"
        }),
        "{st}"
    );
    assert!(
        st["audio"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("walkie_missing")
            || st["audio"]["capture"]["error"]
                .as_str()
                .unwrap_or("")
                .contains("walkie_missing"),
        "{st}"
    );
    assert_eq!(st["audio"]["playback"]["state"], "ok", "{st}");
    let name = w.start_task(&["@sleep=0.2"]);
    assert_eq!(w.wait_finished(&name, T)["state"], "succeeded");
    let (_, out, _) = w.ctl(&["status"]);
    assert!(
        out.contains("audio:") && out.contains("walkie_missing"),
        "{out}"
    );
}

#[test]
fn an_answer_arriving_slower_than_it_plays_is_counted_as_speech_gaps_not_xruns() {
    // At 0.7 of real time each 100 ms of the answer comes about 143 ms after the last: the
    // speaker runs dry for ~43 ms between them (less than it waits before it goes quiet).
    // Twenty times faster, everything is there before it is needed.
    for (speed, slow) in [("0.7", true), ("20", false)] {
        let mut w = Walkie::new();
        let dir = w.dir.path().to_path_buf();
        write_wav(&dir.join("reply.wav"), &speech(24_000));
        std::fs::write(
            dir.join("script.json"),
            json!({"default": {"say": "ok", "wav": "reply.wav"}}).to_string(),
        )
        .unwrap();
        let fake = FakeRealtime::start(
            &dir,
            &[
                "--script",
                dir.join("script.json").to_str().unwrap(),
                "--speed",
                speed,
            ],
        );
        w.write_config(&w.realtime_config(&fake, "", "").replace(
            "[audio]\nbackend = \"none\"\n",
            &format!(
                "[audio]\nbackend = \"wav\"\noutput_wav = \"{}\"\nearcons = false\n",
                dir.join("out.wav").display()
            ),
        ));
        w.start();
        w.wait_connected();
        w.ctl(&["say", "hello"]);
        let mut st = Value::Null;
        assert!(
            wait_until(T, || {
                st = w.ctl_json(&["status"]);
                st["conversation"]["playing"] == true
            }),
            "the answer never played: {st}"
        );
        // `playing` also drops between late pieces: the end is the response done and the
        // speaker quiet after it.
        assert!(
            wait_until(T, || {
                st = w.ctl_json(&["status"]);
                st["conversation"]["active_response"].is_null()
                    && st["conversation"]["playing"] == false
            }),
            "the answer never ended: {st}"
        );
        let gaps = st["audio"]["speech_gaps"].as_u64().expect("speech_gaps");
        if slow {
            assert!(gaps >= 3, "speed {speed}: {gaps} gap(s): {st}");
        } else {
            assert_eq!(gaps, 0, "speed {speed}: {st}");
        }
        assert_eq!(st["audio"]["xruns"], 0, "speed {speed}: {st}");
    }
}

#[test]
fn the_wav_backend_runs_the_voice_loop() {
    let mut w = Walkie::new();
    let dir = w.dir.path().to_path_buf();
    let input: Vec<i16> = (0..24_000 * 3).map(mic_sample).collect();
    write_wav(&dir.join("mic.wav"), &input);
    write_wav(&dir.join("reply.wav"), &speech(12_000));
    std::fs::write(
        dir.join("script.json"),
        json!({"default": {"say": "ok", "wav": "reply.wav"}}).to_string(),
    )
    .unwrap();
    let fake = FakeRealtime::start(
        &dir,
        &["--script", dir.join("script.json").to_str().unwrap()],
    );
    w.write_config(&w.realtime_config(&fake, "", "").replace(
        "[audio]\nbackend = \"none\"\n",
        &format!(
            "[audio]\nbackend = \"wav\"\ninput_wav = \"{}\"\noutput_wav = \"{}\"\nearcons = false\n",
            dir.join("mic.wav").display(),
            dir.join("out.wav").display()
        ),
    ));
    w.start();
    w.wait_connected();
    std::thread::sleep(Duration::from_millis(800)); // the pre-roll window fills
    w.ctl(&["press"]);
    let pressed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let held = pressed.elapsed().as_millis() as usize;
    w.ctl(&["release"]);
    fake.wait_events(T, "commit", |ev| {
        ev.iter()
            .any(|(_, e)| e["type"] == "input_audio_buffer.commit")
    });
    wait_answers_played(&w, 1);
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(w.wait_exit(T), Some(0));
    let sent = appended_samples(&fake);
    let first = sent[0];
    let start = (0..PATTERN_PERIOD as usize).find(|&n| mic_sample(n) == first);
    let ms = sent.len() / 24;
    assert!(
        (250 + held..=300 + held + 200).contains(&ms),
        "pre-roll + {held} ms held: {ms} ms (first sample index {start:?})"
    );
    let start = start.unwrap();
    assert!(
        start >= 24 * 250,
        "the pre-roll reaches back before the press (starts at sample {start})"
    );
    let out = read_raw(&dir.join("out.wav"));
    let reply = speech(12_000);
    assert!(
        find(&out, &reply[..2400]).is_some(),
        "the answer is in the output WAV"
    );
}
