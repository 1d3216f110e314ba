//! The audio engine through its public API, on ALSA plugin devices (no sound card needed).
//!
//! alsa-lib reads its configuration once per process, so this test binary writes
//! tools/alsa/walkie-test.conf (paths filled in) to a temporary directory and points
//! `ALSA_CONFIG_PATH` at it before the first test touches ALSA; every test shares that
//! configuration, each with its own speaker file. The tests drive [`Audio`] the way the
//! daemon does: a `mio::Poll` on the waker, `on_wake`/`on_timeout` at the deadlines.
//! Debug builds run the threads under the allocation guard, so an allocation in a period
//! loop aborts this binary.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use walkie::audio::{
    Audio, AudioBackend, AudioReport, AudioSettings, Which, earcon, list_pcms, wav,
};
use walkie::config::AudioConfig;
use walkie::voice::{Earcon, SAMPLE_RATE};

/// The microphone's input file: one second of a pattern with no zero in it (so the
/// silence after it is recognisable) and no repeated value (so a stretch can be located).
fn input_pattern() -> Vec<i16> {
    (0..SAMPLE_RATE as usize)
        .map(|i| ((i * 37) % 30_000) as i16 + 1)
        .collect()
}

/// A pattern for the speaker (distinct from the input).
fn speech_pattern(frames: usize) -> Vec<i16> {
    (0..frames)
        .map(|i| -(((i * 13) % 15_000) as i16) - 1)
        .collect()
}

/// The shared ALSA configuration directory (created on first use).
fn alsa_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let input: Vec<u8> = input_pattern()
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        std::fs::write(dir.path().join("input.raw"), input).expect("write input");
        let template = include_str!("../tools/alsa/walkie-test.conf");
        let conf = dir.path().join("asound.conf");
        let dir_str = dir.path().to_str().expect("utf-8 temp path");
        std::fs::write(&conf, template.replace("@DIR@", dir_str)).expect("write conf");
        // SAFETY: every test calls alsa_dir() before anything that reads the environment
        // from C (alsa-lib), and the OnceLock makes the others wait here; no other thread
        // of this process reads the environment meanwhile.
        unsafe {
            std::env::set_var(
                "ALSA_CONFIG_PATH",
                format!("/usr/share/alsa/alsa.conf:{}", conf.display()),
            );
        }
        dir
    })
    .path()
}

fn alsa_settings(capture: &str, playback: &str, earcons: bool) -> AudioSettings {
    alsa_dir();
    AudioSettings::from_config(&AudioConfig {
        backend: AudioBackend::Alsa,
        capture_device: capture.into(),
        playback_device: playback.into(),
        earcons,
        ..AudioConfig::default()
    })
}

/// The daemon's loop around an [`Audio`], reduced to what the engine needs.
struct Harness {
    poll: mio::Poll,
    events: mio::Events,
    audio: Option<Audio>,
    reports: Vec<AudioReport>,
}

impl Harness {
    fn start(settings: AudioSettings) -> Harness {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(1)).expect("waker"));
        Harness {
            poll,
            events: mio::Events::with_capacity(8),
            audio: Some(Audio::start(settings, waker)),
            reports: Vec::new(),
        }
    }

    fn audio(&mut self) -> &mut Audio {
        self.audio.as_mut().expect("running")
    }

    /// One loop iteration: wait for the waker or the engine's deadline (at most 20 ms).
    fn turn(&mut self) {
        let now = Instant::now();
        let deadline = self.audio().next_deadline();
        let timeout = deadline
            .map(|d| d.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(20))
            .min(Duration::from_millis(20));
        self.poll
            .poll(&mut self.events, Some(timeout))
            .expect("poll");
        let woken = !self.events.is_empty();
        let now = Instant::now();
        let reports = if woken {
            self.audio().on_wake(now)
        } else {
            self.audio().on_timeout(now)
        };
        self.reports.extend(reports);
    }

    /// Turns the loop until `done` holds, failing after `limit`.
    fn until(&mut self, what: &str, limit: Duration, mut done: impl FnMut(&mut Harness) -> bool) {
        let give_up = Instant::now() + limit;
        while !done(self) {
            assert!(
                Instant::now() < give_up,
                "timed out waiting for {what}; reports: {:?}",
                self.reports
            );
            self.turn();
        }
    }

    /// Turns the loop for `d` of real time (lets the speaker run on).
    fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.turn();
        }
    }

    fn opened(&self, which: Which) -> bool {
        self.reports
            .iter()
            .any(|r| matches!(r, AudioReport::DeviceOpened { which: w, .. } if *w == which))
    }

    /// Stops the engine (joins the threads, closes the devices: files are complete).
    fn stop(&mut self) {
        if let Some(audio) = self.audio.take() {
            audio.stop();
        }
    }
}

fn read_raw(path: &Path) -> Vec<i16> {
    std::fs::read(path)
        .expect("speaker file")
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn speaker_file(name: &str) -> PathBuf {
    alsa_dir().join(format!("{name}.raw"))
}

/// Asserts `out` is silence, then exactly `expected`, then silence; returns where it starts.
fn assert_played_exactly(out: &[i16], expected: &[i16]) -> usize {
    let start = out
        .iter()
        .position(|s| *s != 0)
        .expect("nothing but silence was played");
    assert!(
        out.len() >= start + expected.len(),
        "output ends after {} of {} samples",
        out.len() - start,
        expected.len()
    );
    assert!(
        out[start..start + expected.len()] == *expected,
        "played samples differ from the queued ones"
    );
    assert!(
        out[start + expected.len()..].iter().all(|s| *s == 0),
        "something other than silence followed"
    );
    start
}

#[test]
fn capture_from_file_delivers_the_input_exactly_in_order() {
    let t0 = Instant::now();
    let mut h = Harness::start(alsa_settings(
        "walkie_capture",
        "walkie_speaker_capture",
        false,
    ));
    h.audio().set_streaming(true);
    let input = input_pattern();
    let want = input.len() + SAMPLE_RATE as usize / 10;
    let mut got = Vec::new();
    h.until(
        "the input and 100 ms after it",
        Duration::from_secs(20),
        |h| {
            let now = Instant::now();
            h.audio().read_capture(now, &mut got);
            got.len() >= want
        },
    );
    // The file plugin has no clock: the thread holds it to real time.
    let real_time = t0.elapsed().as_millis() as usize * 24;
    assert!(
        got.len() <= real_time + 240,
        "{} frames in {real_time}",
        got.len()
    );
    assert!(got[..input.len()] == input[..], "captured samples differ");
    assert!(
        got[input.len()..].iter().all(|s| *s == 0),
        "after the end of the file the microphone hears silence"
    );
    let status = h.audio().status();
    assert_eq!(status.capture.state, "ok");
    assert_eq!(status.capture.device, "walkie_capture");
    assert_eq!(status.state, "ok");
    h.stop();
}

#[test]
fn preroll_holds_recent_capture_minus_what_the_speaker_drowned() {
    let mut h = Harness::start(alsa_settings(
        "walkie_capture",
        "walkie_speaker_preroll",
        false,
    ));
    let input = input_pattern();
    h.until("capture to open", Duration::from_secs(10), |h| {
        h.opened(Which::Capture)
    });
    h.run_for(Duration::from_millis(400));
    let mut window = Vec::new();
    h.audio().take_preroll(Instant::now(), &mut window);
    // The default window is 300 ms, taken from the capture that just happened.
    assert!(
        window.len() >= 200 * 24,
        "window of {} samples",
        window.len()
    );
    assert!(
        window.len() <= 300 * 24 + 240,
        "window of {} samples",
        window.len()
    );
    let at = input
        .iter()
        .position(|s| *s == window[0])
        .expect("the window starts inside the input");
    let n = window.len().min(input.len() - at);
    assert!(
        window[..n] == input[at..at + n],
        "the window is a contiguous stretch of the input"
    );
    // What the pre-roll returned is not returned again as live audio: the live stream
    // goes on exactly after the window's last sample (an idle capture thread hands over
    // what it had not read yet as live audio, so nothing is missing either).
    h.audio().set_streaming(true);
    let mut live = Vec::new();
    h.until("live audio", Duration::from_secs(10), |h| {
        h.audio().read_capture(Instant::now(), &mut live);
        live.len() >= 240
    });
    // (Past the end of the input file the microphone hears silence.)
    let next = input.get(at + window.len()).copied().unwrap_or(0);
    assert_eq!(
        live[0], next,
        "live audio does not continue the window exactly"
    );
    h.audio().set_streaming(false);

    // While the speaker talks, everything the microphone captured is echo.
    let speech = speech_pattern(2 * SAMPLE_RATE as usize);
    h.audio().play(&speech);
    h.until("600 ms of speech", Duration::from_secs(10), |h| {
        h.audio().progress().consumed_frames >= 600 * 24
    });
    let mut window = Vec::new();
    h.audio().take_preroll(Instant::now(), &mut window);
    assert!(
        window.is_empty(),
        "{} samples of echo in the pre-roll",
        window.len()
    );

    // After a barge-in the speaker is silent at once: fresh capture fills the window again.
    h.audio().flush_playback();
    h.run_for(Duration::from_millis(500));
    let mut window = Vec::new();
    h.audio().take_preroll(Instant::now(), &mut window);
    assert!(
        window.len() >= 200 * 24,
        "window of {} samples",
        window.len()
    );
    h.stop();
}

#[test]
fn playback_to_file_writes_exactly_what_was_played() {
    let mut h = Harness::start(alsa_settings("walkie_silence", "walkie_speaker", false));
    h.until("playback to open", Duration::from_secs(10), |h| {
        h.opened(Which::Playback)
    });
    // The device runs (silence) before any speech is queued.
    h.run_for(Duration::from_millis(100));
    let speech = speech_pattern(SAMPLE_RATE as usize * 3 / 10);
    h.audio().play(&speech[..1000]);
    h.audio().play(&speech[1000..]);
    assert!(h.audio().progress().is_playing());
    h.until("the speech to play", Duration::from_secs(10), |h| {
        !h.audio().progress().is_playing()
    });
    let progress = h.audio().progress();
    assert_eq!(progress.queued_frames, speech.len() as u64);
    assert_eq!(progress.consumed_frames, speech.len() as u64);
    h.run_for(Duration::from_millis(100));
    assert_eq!(h.audio().status().playback.state, "ok");
    h.stop();
    let out = read_raw(&speaker_file("speaker"));
    let start = assert_played_exactly(&out, &speech);
    assert!(start > 0, "silence was written while nothing was queued");
}

#[test]
fn flush_stops_playback_at_once_and_counts_the_rest_as_consumed() {
    let mut h = Harness::start(alsa_settings(
        "walkie_silence",
        "walkie_speaker_flush",
        false,
    ));
    let speech = speech_pattern(5 * SAMPLE_RATE as usize);
    h.audio().play(&speech);
    h.until("300 ms of speech to play", Duration::from_secs(10), |h| {
        h.audio().progress().consumed_frames >= 300 * 24
    });
    let before = h.audio().progress();
    h.audio().flush_playback();
    let after = h.audio().progress();
    assert_eq!(after.queued_frames, speech.len() as u64);
    assert_eq!(after.consumed_frames, after.queued_frames);
    assert!(!after.is_playing());
    h.run_for(Duration::from_millis(300));
    // Speech queued after the flush plays in full.
    let more = speech_pattern(2_400);
    h.audio().play(&more);
    h.until("the speech after the flush", Duration::from_secs(10), |h| {
        !h.audio().progress().is_playing()
    });
    h.run_for(Duration::from_millis(50));
    h.stop();
    let out = read_raw(&speaker_file("speaker_flush"));
    let start = out.iter().position(|s| *s != 0).expect("speech was played");
    let played = out[start..]
        .iter()
        .position(|s| *s == 0)
        .expect("speech stopped");
    // Everything reported consumed before the flush reached the device, and hardly more
    // (the thread notices the flush within a period).
    assert!(
        played as u64 >= before.consumed_frames,
        "{played} played, {} consumed",
        before.consumed_frames
    );
    assert!(
        (played as u64) < before.consumed_frames + 100 * 24,
        "{played} played, {} consumed before the flush",
        before.consumed_frames
    );
    assert!(out[start..start + played] == speech[..played]);
    // Then silence, then the new speech, then silence.
    assert_played_exactly(&out[start + played..], &more);
}

#[test]
fn earcons_are_mixed_into_the_output_when_enabled() {
    let mut h = Harness::start(alsa_settings(
        "walkie_silence",
        "walkie_speaker_earcons_on",
        true,
    ));
    h.until("playback to open", Duration::from_secs(10), |h| {
        h.opened(Which::Playback)
    });
    h.audio().play_earcon(Earcon::TaskDone);
    let chime = earcon::generate(Earcon::TaskDone);
    // Earcons are not speech.
    assert!(!h.audio().progress().is_playing());
    h.run_for(Duration::from_millis(chime.len() as u64 / 24 + 200));
    assert_eq!(h.audio().progress().queued_frames, 0);
    h.stop();
    let out = read_raw(&speaker_file("speaker_earcons_on"));
    let lead = chime
        .iter()
        .position(|s| *s != 0)
        .expect("chime not silent");
    let first = out
        .iter()
        .position(|s| *s != 0)
        .expect("the earcon was played");
    let start = first - lead;
    let end = chime
        .iter()
        .rposition(|s| *s != 0)
        .expect("chime not silent")
        + 1;
    assert!(
        out[start..start + end] == chime[..end],
        "the output is the chime"
    );
    assert!(out[start + end..].iter().all(|s| *s == 0));
}

#[test]
fn earcons_are_silent_when_disabled() {
    let t0 = Instant::now();
    let mut h = Harness::start(alsa_settings(
        "walkie_silence",
        "walkie_speaker_earcons_off",
        false,
    ));
    h.until("playback to open", Duration::from_secs(10), |h| {
        h.opened(Which::Playback)
    });
    h.audio().play_earcon(Earcon::TaskDone);
    h.run_for(Duration::from_millis(600));
    h.stop();
    let elapsed = t0.elapsed();
    let out = read_raw(&speaker_file("speaker_earcons_off"));
    // The file plugin has no clock: the thread holds it to real time (plus its lead of
    // five periods). With nothing to play it lets the device fall silent and parks, so
    // the file holds only the silence written around the (muted) request.
    let real_time = elapsed.as_millis() as usize * 24;
    assert!(
        out.len() <= real_time + 6 * 240,
        "{} frames in {elapsed:?}",
        out.len()
    );
    assert!(
        out.iter().all(|s| *s == 0),
        "an earcon played although disabled"
    );
}

#[test]
fn a_capture_device_that_fails_leaves_playback_working() {
    let mut h = Harness::start(alsa_settings(
        "walkie_missing",
        "walkie_speaker_capture_failed",
        false,
    ));
    h.until("the capture failure", Duration::from_secs(10), |h| {
        h.audio().status().capture.state == "failed"
    });
    let status = h.audio().status();
    assert_eq!(status.state, "failed");
    let error = status
        .capture
        .error
        .expect("an error for the failed device");
    assert!(error.contains("walkie_missing"), "{error}");
    assert!(status.error.expect("overall error").contains("capture"));
    assert!(h.reports.iter().any(|r| matches!(
        r,
        AudioReport::DeviceFailed {
            which: Which::Capture,
            ..
        }
    )));
    let speech = speech_pattern(SAMPLE_RATE as usize / 5);
    h.audio().play(&speech);
    h.until("the speech to play", Duration::from_secs(10), |h| {
        !h.audio().progress().is_playing()
    });
    h.run_for(Duration::from_millis(50));
    assert_eq!(h.audio().status().playback.state, "ok");
    h.stop();
    assert_played_exactly(&read_raw(&speaker_file("speaker_capture_failed")), &speech);
}

#[test]
fn plug_layer_converts_to_the_device_rate() {
    let mut h = Harness::start(alsa_settings("walkie_silence", "walkie_speaker_48k", false));
    let tone: Vec<i16> = (0..SAMPLE_RATE as usize / 4)
        .map(|i| (8000.0 * (i as f64 * 2.0 * std::f64::consts::PI * 440.0 / 24_000.0).sin()) as i16)
        .collect();
    h.audio().play(&tone);
    h.until("the tone to play", Duration::from_secs(10), |h| {
        !h.audio().progress().is_playing()
    });
    h.run_for(Duration::from_millis(50));
    assert_eq!(h.audio().status().playback.state, "ok");
    h.stop();
    let out = read_raw(&alsa_dir().join("speaker_48k.raw"));
    let first = out.iter().position(|s| *s != 0).expect("tone played");
    let last = out.iter().rposition(|s| *s != 0).expect("tone played");
    let span = last - first + 1;
    // Twice the frames at 48 kHz (give or take the converter's edges).
    assert!(
        span.abs_diff(2 * tone.len()) < 200,
        "{span} frames at 48 kHz for {} at 24 kHz",
        tone.len()
    );
}

#[test]
fn wav_backend_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input_path = dir.path().join("mic.wav");
    let output_path = dir.path().join("speaker.wav");
    let input = input_pattern();
    let mut w = wav::WavWriter::create(&input_path).expect("create input");
    w.append(&input).expect("append");
    w.update_header().expect("header");
    drop(w);
    let settings = AudioSettings::from_config(&AudioConfig {
        backend: AudioBackend::Wav,
        input_wav: input_path.to_str().expect("utf-8").into(),
        output_wav: output_path.to_str().expect("utf-8").into(),
        earcons: false,
        ..AudioConfig::default()
    });
    let mut h = Harness::start(settings);
    h.audio().set_streaming(true);
    let want = input.len() + SAMPLE_RATE as usize / 10;
    let mut got = Vec::new();
    h.until("the wav input", Duration::from_secs(20), |h| {
        h.audio().read_capture(Instant::now(), &mut got);
        got.len() >= want
    });
    assert!(got[..input.len()] == input[..], "captured samples differ");
    assert!(got[input.len()..].iter().all(|s| *s == 0));
    let status = h.audio().status();
    assert_eq!(status.state, "ok");
    assert_eq!(status.playback.device, output_path.display().to_string());

    let speech = speech_pattern(SAMPLE_RATE as usize / 4);
    h.audio().play(&speech);
    h.until("the speech to play", Duration::from_secs(10), |h| {
        !h.audio().progress().is_playing()
    });
    // While running, the output is a valid WAV (its header may lag behind the data).
    let (format, _) = wav::decode(&std::fs::read(&output_path).expect("read output"))
        .expect("the output is a valid WAV while running");
    assert_eq!((format.channels, format.sample_rate), (1, SAMPLE_RATE));
    h.run_for(Duration::from_millis(100));
    h.stop();
    let bytes = std::fs::read(&output_path).expect("read output");
    let (_, out) = wav::decode(&bytes).expect("valid WAV after stop");
    // After stop the header covers every byte.
    assert_eq!(out.len() * 2 + 44, bytes.len());
    let start = assert_played_exactly(&out, &speech);
    assert!(start > 0, "the speaker ran silent before the speech");
}

#[test]
fn a_playback_device_that_fails_leaves_capture_working_and_speech_draining() {
    let mut h = Harness::start(alsa_settings(
        "walkie_capture",
        "walkie_missing_speaker",
        false,
    ));
    h.audio().set_streaming(true);
    h.until("the playback failure", Duration::from_secs(10), |h| {
        h.audio().status().playback.state == "failed"
    });
    let error = h.audio().status().playback.error.expect("an error");
    assert!(error.contains("walkie_missing_speaker"), "{error}");
    // Speech still drains at real time (nobody waits forever for a dead speaker).
    h.audio().play(&speech_pattern(SAMPLE_RATE as usize / 5));
    assert!(h.audio().progress().is_playing());
    h.until("the speech to drain", Duration::from_secs(10), |h| {
        !h.audio().progress().is_playing()
    });
    let input = input_pattern();
    let mut got = Vec::new();
    h.until("the input", Duration::from_secs(20), |h| {
        h.audio().read_capture(Instant::now(), &mut got);
        got.len() >= input.len()
    });
    assert!(got[..input.len()] == input[..], "captured samples differ");
    assert_eq!(h.audio().status().capture.state, "ok");
    h.stop();
}

#[test]
fn a_device_that_appears_later_is_opened_on_retry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input_path = dir.path().join("later.wav");
    let settings = AudioSettings::from_config(&AudioConfig {
        backend: AudioBackend::Wav,
        input_wav: input_path.to_str().expect("utf-8").into(),
        earcons: false,
        ..AudioConfig::default()
    });
    let mut h = Harness::start(settings);
    h.until("the missing input to fail", Duration::from_secs(10), |h| {
        h.audio().status().capture.state == "failed"
    });
    let error = h.audio().status().capture.error.expect("an error");
    assert!(error.contains("later.wav"), "{error}");
    // Written aside and renamed, so no retry sees a half-written file.
    let aside = dir.path().join("later.tmp");
    let mut w = wav::WavWriter::create(&aside).expect("create input");
    w.append(&input_pattern()).expect("append");
    w.update_header().expect("header");
    drop(w);
    std::fs::rename(&aside, &input_path).expect("rename");
    h.until("the input to open", Duration::from_secs(20), |h| {
        h.audio().status().capture.state == "ok"
    });
    let status = h.audio().status();
    assert_eq!(status.state, "ok");
    assert_eq!(status.error, None);
    // One failure report for the whole outage, however many retries it took.
    let failures = h
        .reports
        .iter()
        .filter(|r| matches!(r, AudioReport::DeviceFailed { .. }))
        .count();
    assert_eq!(failures, 1, "{:?}", h.reports);
    h.stop();
}

#[test]
fn list_pcms_shows_configured_devices() {
    alsa_dir();
    let pcms = list_pcms();
    let capture = pcms
        .iter()
        .find(|p| p.name == "walkie_capture")
        .unwrap_or_else(|| panic!("walkie_capture not in {pcms:?}"));
    // Without an IOID hint a PCM may be used both ways.
    assert!(capture.input && capture.output);
    assert!(pcms.iter().any(|p| p.name == "walkie_speaker_48k"));
}
