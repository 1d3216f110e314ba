//! Idle audio through the real binary: while nobody holds the button and nothing plays, the
//! audio threads stop waking every period (the playback thread parks, the capture thread
//! reads in bursts) and nothing they do wakes the main loop — yet the pre-roll taken at a
//! press is as complete as ever and speech plays at once.
//!
//! Wake-ups are counted from outside, in the kernel's per-thread context-switch counters
//! (`/proc/PID/task/TID/status`): a thread that sleeps and is woken counts one voluntary
//! switch. The assertions are about behaviour (parked or not, per period or not), with
//! margins far from both designs, never about speed: rt-bench measures that.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);
/// The capture and playback period (the default `audio.period_ms`).
const PERIOD_MS: u64 = 10;

fn write_wav(path: &Path, samples: &[i16]) {
    let mut f = std::io::BufWriter::new(File::create(path).unwrap());
    let data = (samples.len() * 2) as u32;
    f.write_all(b"RIFF").unwrap();
    f.write_all(&(36 + data).to_le_bytes()).unwrap();
    f.write_all(b"WAVEfmt ").unwrap();
    f.write_all(&16u32.to_le_bytes()).unwrap();
    f.write_all(&1u16.to_le_bytes()).unwrap(); // PCM
    f.write_all(&1u16.to_le_bytes()).unwrap(); // mono
    f.write_all(&24_000u32.to_le_bytes()).unwrap();
    f.write_all(&48_000u32.to_le_bytes()).unwrap();
    f.write_all(&2u16.to_le_bytes()).unwrap();
    f.write_all(&16u16.to_le_bytes()).unwrap();
    f.write_all(b"data").unwrap();
    f.write_all(&data.to_le_bytes()).unwrap();
    for s in samples {
        f.write_all(&s.to_le_bytes()).unwrap();
    }
    f.flush().unwrap();
}

/// Wake-ups of each thread during `d`.
fn wakeups_during(pid: i32, d: Duration) -> HashMap<String, u64> {
    let before = thread_wakeups(pid);
    std::thread::sleep(d);
    let after = thread_wakeups(pid);
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .collect()
}

/// walkie on the wav backend (the same threads and period loops as ALSA), connected to
/// fake-realtime, with `mic` as the microphone; its answers are 0.5 s of tone.
fn idle_walkie(mic: &[i16], earcons: bool) -> (Walkie, FakeRealtime) {
    let mut w = Walkie::new();
    let dir = w.dir.path().to_path_buf();
    write_wav(&dir.join("mic.wav"), mic);
    std::fs::write(
        dir.join("script.json"),
        json!({"default": {"say": "ok", "audio_ms": 500}}).to_string(),
    )
    .unwrap();
    let fake = FakeRealtime::start(
        &dir,
        &["--script", dir.join("script.json").to_str().unwrap()],
    );
    w.write_config(&w.realtime_config(&fake, "", "").replace(
        "[audio]\nbackend = \"none\"\n",
        &format!(
            "[audio]\nbackend = \"wav\"\ninput_wav = \"{}\"\noutput_wav = \"{}\"\nearcons = {earcons}\n",
            dir.join("mic.wav").display(),
            dir.join("out.wav").display()
        ),
    ));
    w.start();
    w.wait_connected();
    (w, fake)
}

#[test]
fn idle_audio_threads_do_not_wake_every_period_nor_the_main_loop() {
    let (w, fake) = idle_walkie(&mic_signal(0x9E37_79B9, 24_000 * 10), true);
    // Let the start-up settle: the speaker's first silence plays out and it parks.
    std::thread::sleep(Duration::from_millis(500));
    let window = Duration::from_secs(3);
    let periods = window.as_millis() as u64 / PERIOD_MS;
    let idle = wakeups_during(w.pid(), window);
    let of = |name: &str| idle.get(name).copied().unwrap_or(0);
    // The speaker is stopped and its thread parked: nothing plays.
    assert!(
        of("walkie-playback") <= 1,
        "the playback thread woke {} times in {window:?} with nothing to play: {idle:?}",
        of("walkie-playback")
    );
    // The microphone is read in bursts, not every period.
    assert!(
        of("walkie-capture") < periods / 4,
        "the capture thread woke {} times in {periods} periods: {idle:?}",
        of("walkie-capture")
    );
    // The main loop only wakes for its own timers (the lazy pre-roll drain every 2 s, the
    // link's ping every 15 s), never for audio: about once a second at most.
    assert!(
        of("walkie") <= window.as_secs() + 2,
        "the main thread woke {} times in {window:?}: {idle:?}",
        of("walkie")
    );
    // The WAV writer sleeps too once the speaker has stopped.
    assert!(
        of("walkie-wav-out") <= 1,
        "the wav writer woke {} times: {idle:?}",
        of("walkie-wav-out")
    );

    // Speech wakes the playback thread at once, and it parks again when it has played.
    w.ctl(&["say", "hello"]);
    fake.wait_events(T, "the response", |ev| {
        ev.iter().any(|(_, e)| e["type"] == "response.create")
    });
    assert!(wait_until(
        T,
        || w.ctl_json(&["status"])["conversation"]["playing"] == true
    ));
    assert!(wait_until(
        T,
        || w.ctl_json(&["status"])["conversation"]["playing"] == false
    ));
    let out = std::fs::read(w.path("out.wav")).unwrap();
    let loud = out[44..]
        .chunks_exact(2)
        .filter(|c| i16::from_le_bytes([c[0], c[1]]).unsigned_abs() > 1000)
        .count();
    assert!(
        loud > 24_000 / 4,
        "the answer was not played ({loud} loud samples)"
    );
    std::thread::sleep(Duration::from_millis(500));
    let after = wakeups_during(w.pid(), Duration::from_secs(1));
    assert!(
        after.get("walkie-playback").copied().unwrap_or(0) <= 1,
        "the playback thread did not park again after the answer: {after:?}"
    );
}

#[test]
fn the_preroll_is_whole_after_a_long_idle() {
    let mic = mic_signal(0x9E37_79B9, 24_000 * 10);
    // No earcons: the press earcon's echo padding would cut the last few milliseconds
    // before the press out of the pre-roll, on purpose, and hide what is checked here.
    let (w, fake) = idle_walkie(&mic, false);
    // Long enough for the capture thread to have lingered many times, and for the main
    // loop's lazy drain to have run and gone back to sleep.
    std::thread::sleep(Duration::from_secs(3));
    let (code, _, err) = w.ctl(&["press"]);
    assert_eq!(code, 0, "{err}");
    let held_from = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let held = held_from.elapsed();
    let (code, _, err) = w.ctl(&["release"]);
    assert_eq!(code, 0, "{err}");
    fake.wait_events(T, "commit", |ev| {
        ev.iter()
            .any(|(_, e)| e["type"] == "input_audio_buffer.commit")
    });
    let sent = appended_samples(&fake);
    // Exactly one contiguous stretch of the microphone: no gap where the pre-roll taken at
    // the press meets what the idle capture thread had not read yet, nothing twice.
    let start = mic
        .windows(16)
        .position(|w| w == &sent[..16])
        .expect("the first samples sent come from the microphone");
    assert!(
        sent[..] == mic[start..start + sent.len()],
        "the audio sent is not one contiguous stretch of the microphone"
    );
    // The whole pre-roll window (300 ms) went out before the live audio of the hold: the
    // daemon held the button at least as long as this test did. One period of slack for
    // the partial period at each end.
    let sent_ms = sent.len() as u64 / 24;
    let floor = 300 + held.as_millis() as u64 - 2 * PERIOD_MS;
    assert!(
        sent_ms >= floor,
        "{sent_ms} ms sent for a 300 ms pre-roll and a {held:?} hold (at least {floor} ms)"
    );
    assert!(
        sent_ms <= 300 + held.as_millis() as u64 + 150,
        "{sent_ms} ms sent for a 300 ms pre-roll and a {held:?} hold"
    );
}
