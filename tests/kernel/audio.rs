//! The sound card: snd-aloop, a kernel ALSA driver with a real clock. What the test plays
//! into `hw:Loopback,0,N` walkie captures from `hw:Loopback,1,N`; what walkie plays into
//! `hw:Loopback,0,N` the test records from `hw:Loopback,1,N`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::guest::{Guest, PATTERN_PERIOD, Setup, T, hold, pattern, pattern_index, poll, speech};
use crate::sound::{Stream, frequency, sine};
use crate::uinput::VirtualDevice;

/// The microphone: the test plays here, walkie captures the other end.
const MIC_OUT: &str = "hw:Loopback,0,0";
const MIC_IN: &str = "hw:Loopback,1,0";
/// The speaker: walkie plays here, the test records the other end.
const SPEAKER_OUT: &str = "hw:Loopback,0,1";
const SPEAKER_IN: &str = "hw:Loopback,1,1";
/// KEY_F14: the audio tests' button, a key the button tests' `auto` never looks for.
const KEY_F14: u16 = 184;

/// The `[audio]` section. `period_ms`: 10 (the default) where only capture matters; 20
/// where a test judges what was played, since the playback buffer is four periods and
/// emulation on a busy host can starve the guest for longer than 40 ms.
fn alsa(capture: &str, playback: &str, period_ms: u32) -> String {
    format!(
        "backend = \"alsa\"\ncapture_device = \"{capture}\"\nplayback_device = \"{playback}\"\n\
         earcons = false\nperiod_ms = {period_ms}"
    )
}

/// The scheduling policy (1: SCHED_FIFO) and priority of `pid`'s thread named `name`.
fn thread_policy(pid: i32, name: &str) -> Option<(u32, u32)> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // Fields 40 (rt_priority) and 41 (policy) of proc(5), counted from 1 with the pid.
        return Some((fields.get(38)?.parse().ok()?, fields.get(37)?.parse().ok()?));
    }
    None
}

/// The streams whose xruns matter to a check.
const CAPTURE: &[&str] = &["capture"];
const PLAYBACK: &[&str] = &["playback"];

/// walkie's xrun count on `devices`.
fn xruns(g: &Guest, devices: &[&str]) -> u64 {
    let st = g.status();
    // A speaker that ran out of speech mid-answer (the guest's main loop or fake-realtime
    // starved) fills the wait with silence: a break walkie counts too, not a device fault.
    let gaps = if devices.contains(&"playback") {
        st["audio"]["speech_gaps"].as_u64().unwrap_or(0)
    } else {
        0
    };
    devices
        .iter()
        .map(|d| st["audio"][*d]["xruns"].as_u64().unwrap_or(0))
        .sum::<u64>()
        + gaps
}

// Under emulation on a busy host the guest can be starved for longer than a device buffer
// lasts. An xrun then breaks the audio at that point, and walkie counts it and recovers.
// So the checks below are exact when no xrun was counted, and otherwise allow no more
// breaks than xruns counted (walkie's, and the test's own streams'; for the speaker also
// the speech gaps walkie counts when the answer reached it late): a break with nothing
// counted behind it is walkie's fault, whatever the load.

/// How `expected` appears in `recorded` from `from` on: its samples in order, and how many
/// times something else (silence, a stale buffer replayed by an underrun) came between them.
struct Followed {
    /// Samples of `expected` found, in order.
    matched: usize,
    /// Runs of other samples between them.
    breaks: usize,
    /// One past the last matched sample in `recorded`.
    end: usize,
}

fn follow(recorded: &[i16], from: usize, expected: &[i16]) -> Followed {
    let (mut i, mut j, mut breaks) = (from, 0, 0);
    while j < expected.len() && i < recorded.len() {
        if recorded[i] == expected[j] {
            i += 1;
            j += 1;
            continue;
        }
        // Something else: find where the expected samples resume (within two seconds).
        let want = &expected[j..(j + 48).min(expected.len())];
        let window = &recorded[i..(i + 48_000 + want.len()).min(recorded.len())];
        match find(window, want) {
            Some(k) => {
                breaks += 1;
                i += k;
            }
            None => break,
        }
    }
    Followed {
        matched: j,
        breaks,
        end: i,
    }
}

/// Where the pattern breaks in `audio` (a gap, a repeat, or a run of anything else counts
/// once).
fn pattern_breaks(audio: &[i16]) -> Vec<usize> {
    let mut breaks = Vec::new();
    let mut expect: Option<usize> = None;
    let mut broken = false;
    for (i, &s) in audio.iter().enumerate() {
        if expect.is_some_and(|e| s == pattern(e)) {
            broken = false;
            expect = expect.map(|e| e + 1);
            continue;
        }
        match pattern_index(s) {
            Some(found) => {
                if i > 0 && !broken {
                    breaks.push(i);
                }
                expect = Some(found);
            }
            None => {
                if !broken {
                    breaks.push(i);
                }
                broken = true;
                expect = None;
                continue;
            }
        }
        broken = false;
        expect = expect.map(|e| e + 1);
    }
    breaks
}

/// The recording from `from` on as runs: the answer's samples (with their place in it),
/// silence, or other sound; for failure messages.
fn describe(recorded: &[i16], from: usize, answer: &[i16]) -> String {
    let mut out = Vec::new();
    let mut i = from;
    let mut j = 0;
    while i < recorded.len() && out.len() < 40 {
        let start = i;
        if recorded[i] == 0 {
            while i < recorded.len() && recorded[i] == 0 {
                i += 1;
            }
            out.push(format!("silence {} ms", (i - start) / 24));
        } else if let Some(k) = find(
            &answer[j.min(answer.len())..],
            &recorded[i..(i + 24).min(recorded.len())],
        )
        .map(|k| k + j)
        .or_else(|| find(answer, &recorded[i..(i + 24).min(recorded.len())]))
        {
            let mut n = 0;
            while i < recorded.len() && k + n < answer.len() && recorded[i] == answer[k + n] {
                i += 1;
                n += 1;
            }
            j = k + n;
            out.push(format!("answer {}–{} ms", k / 24, (k + n) / 24));
        } else {
            while i < recorded.len()
                && recorded[i] != 0
                && find(answer, &recorded[i..(i + 24).min(recorded.len())]).is_none()
            {
                i += 1;
            }
            out.push(format!("other sound {} ms", (i - start).max(1) / 24));
        }
    }
    out.join(", ")
}

/// Where `needle` starts in `hay`.
fn find(hay: &[i16], needle: &[i16]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Percentiles of `values` (sorted in place), in the units given.
fn spread(values: &mut [f64]) -> Value {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    json!({"n": values.len(), "p50": at(0.5), "p99": at(0.99), "max": at(1.0)})
}

/// The absolute frame of the player that carried `sample` of the pattern, the one nearest
/// to `near` (the pattern repeats every 1.25 s; timing tells which repetition).
fn frame_of(sample: i16, near: u64) -> u64 {
    let index = pattern_index(sample).expect("a pattern sample") as u64;
    let period = PATTERN_PERIOD as u64;
    let base = near.saturating_sub(period / 2);
    base + (index + period - base % period) % period
}

kernel_test! {
    fn the_microphone_on_a_real_clock_reaches_the_model_whole_with_its_preroll() {
        let mic = Stream::play(MIC_OUT, 24_000, |n| pattern(n as usize));
        let g = Guest::start(Setup {
            audio: Some(&alsa(MIC_IN, SPEAKER_OUT, 10)),
            tap: true,
            ..Setup::default()
        });
        let st = g.status();
        assert_eq!(st["audio"]["rt"], true, "SCHED_FIFO reported: {st}");
        for thread in ["walkie-capture", "walkie-playback"] {
            let (policy, priority) = thread_policy(g.w.pid(), thread).expect(thread);
            assert_eq!(policy, 1, "{thread} runs SCHED_FIFO");
            assert!(priority > 0, "{thread} priority {priority}");
        }
        hold(1000); // the pre-roll window fills
        let before = xruns(&g, CAPTURE) + mic.xruns();
        let press_sent = Instant::now();
        g.press();
        let press_done = Instant::now();
        hold(1000);
        let release_sent = Instant::now();
        g.release();
        let release_done = Instant::now();
        g.wait_count("input_audio_buffer.commit", 1);
        let allowed = xruns(&g, CAPTURE) + mic.xruns() - before;

        // Whole: every sample follows the one before, nothing lost or doubled.
        let audio = g.appended_audio();
        let breaks = pattern_breaks(&audio);
        assert!(
            breaks.len() as u64 <= allowed,
            "the turn's audio breaks at samples {breaks:?} of {} with {allowed} xrun(s) counted",
            audio.len()
        );
        // Where it sits on the card's timeline (the pattern repeats every 1.25 s; the press
        // time says which repetition).
        let frame = |at| mic.frame_at(at).unwrap() as i64;
        let first = frame_of(audio[0], (frame(press_sent) - 7_200).max(0) as u64) as i64;
        let last = first + audio.len() as i64 - 1;
        let (early, late) = (frame(press_sent) - first, frame(press_done) - first);
        let tail_ms = (last - frame(release_sent)) / 24;
        let answer_ms = (frame(release_done) - frame(release_sent)) / 24;

        // Measured, not asserted: from the last frame of each live append passing through
        // the card to the append arriving on the wire.
        let tap = g.tap.as_ref().unwrap().appends();
        let mut sent = 0i64;
        let mut latencies = Vec::new();
        for (at, samples) in &tap {
            sent += samples.len() as i64;
            if *at <= press_done + Duration::from_millis(100) || !breaks.is_empty() {
                continue;
            }
            if let Some(played) = mic.time_of((first + sent - 1) as u64) {
                latencies.push(if *at >= played {
                    (*at - played).as_secs_f64() * 1000.0
                } else {
                    -(played - *at).as_secs_f64() * 1000.0
                });
            }
        }
        if !latencies.is_empty() {
            crate::vm::report(
                "the_microphone_on_a_real_clock_reaches_the_model_whole_with_its_preroll",
                json!({
                    "mic_to_wire_ms": spread(&mut latencies),
                    "period_ms": 10,
                    "preroll_ms": [early / 24, late / 24],
                    "tail_after_release_ms": [tail_ms, answer_ms],
                }),
            );
        }
        if !breaks.is_empty() {
            return; // the timeline checks below need the audio whole
        }
        // The pre-roll: the first sample went through the card 300 ms before walkie took
        // the press (somewhere between sending it and its answer).
        assert!(
            early <= 350 * 24 && late >= 250 * 24,
            "the audio starts {} to {} ms before the press, not 300",
            early / 24,
            late / 24
        );
        // It ends about where walkie took the release, and nothing after it is sent.
        assert!(
            (-50..=answer_ms + 100).contains(&tail_ms),
            "the audio ends {tail_ms} ms after the release was sent ({answer_ms} ms to its answer)"
        );
        let kinds: Vec<String> = g
            .fake
            .events()
            .iter()
            .map(|(_, e)| e["type"].as_str().unwrap_or("").to_owned())
            .collect();
        let commit = kinds.iter().position(|k| k == "input_audio_buffer.commit").unwrap();
        assert!(
            !kinds[commit..].iter().any(|k| k == "input_audio_buffer.append"),
            "audio sent after the commit: {kinds:?}"
        );
        // Real-time pace: no append carried a frame before the card had played it (a
        // walkie ahead of the card's clock would), within the timeline's few milliseconds.
        assert!(latencies.len() >= 10, "{} live appends", latencies.len());
        let earliest = latencies.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(
            earliest >= -10.0,
            "an append arrived {:.1} ms before the card played its last frame",
            -earliest
        );
    }
}

/// The answer played whole: 5 s, a second more than walkie's playback ring holds.
const WHOLE_ANSWER: usize = 5 * 24_000;

kernel_test! {
    fn speech_played_into_the_card_is_recorded_whole() {
        let speaker = Stream::record(SPEAKER_IN, 24_000);
        // The whole answer arrives at once, so a gap in it can only be walkie's. It is
        // longer than walkie's 4 s playback ring: its last second waits in the overflow
        // queue, as a long answer from the real model does.
        let g = Guest::start(Setup {
            audio: Some(&alsa(MIC_IN, SPEAKER_OUT, 20)),
            reply_frames: WHOLE_ANSWER,
            fake_args: &["--speed", "50"],
            ..Setup::default()
        });
        let before = xruns(&g, PLAYBACK) + speaker.xruns();
        g.say("hello");
        g.wait_status("the answer playing", |st| st["conversation"]["playing"] == true);
        g.wait_status("the answer played", |st| st["conversation"]["playing"] == false);
        speaker.wait_recorded(Instant::now(), 300);
        let allowed = xruns(&g, PLAYBACK) + speaker.xruns() - before;
        let recorded = speaker.samples();
        let reply = speech(WHOLE_ANSWER);
        let at = find(&recorded, &reply[..2400]).expect("the answer reached the card");
        let got = follow(&recorded, at, &reply);
        assert_eq!(got.matched, reply.len(), "the whole answer reached the card, in order");
        assert!(
            got.breaks as u64 <= allowed,
            "the answer was broken {} time(s) with {allowed} xrun(s) counted",
            got.breaks
        );
        if allowed == 0 {
            let after = &recorded[got.end..];
            if let Some(i) = after.iter().position(|&s| s != 0) {
                let n = after[i..].iter().take_while(|&&s| s != 0).count();
                panic!(
                    "sound {} ms after the answer: {n} samples, {}",
                    i / 24,
                    match find(&reply, &after[i..i + n.min(48)]) {
                        Some(p) => format!("the answer again from {} ms", p / 24),
                        None => "not from the answer".into(),
                    }
                );
            }
        }
    }
}

/// The barge-in test's answer, long enough to be still streaming when the key is pressed.
const ANSWER_S: usize = 20;
/// The card falls silent this soon after the key goes down (a few ms measured at rest): far
/// less than the seconds of answer walkie holds at the press.
const SILENT_WITHIN_MS: u64 = 1500;
/// How long the recording goes on past that, to hear that the silence lasts.
const LISTEN_MS: u64 = 1000;
/// How much beyond the truncation point the card may play: the device buffer (40 ms), the
/// timelines (20 ms) and a playback thread that saw the drop late.
const DROP_SLACK_MS: i64 = 40 + 20 + 240;

kernel_test! {
    fn a_press_during_the_answer_silences_the_card_where_the_truncation_says() {
        let key = VirtualDevice::create("walkie audio switch", &[KEY_F14], false);
        let button = format!("device = \"{}\"\nkey = \"KEY_F14\"", key.node.display());
        let speaker = Stream::record(SPEAKER_IN, 24_000);
        // Streamed at four times real time, the 20 s answer stays active for 5 s while it
        // plays, and by the press 1.5 s in walkie holds seconds of it not yet played: a press
        // that dropped nothing would let them play on. The default period: the truncation's
        // accuracy depends on it (below).
        let g = Guest::start(Setup {
            audio: Some(&alsa(MIC_IN, SPEAKER_OUT, 10)),
            button: &button,
            reply_frames: ANSWER_S * 24_000,
            fake_args: &["--speed", "4"],
            ..Setup::default()
        });
        let before = xruns(&g, PLAYBACK) + speaker.xruns();
        g.say("tell me everything");
        g.wait_status("the answer playing", |st| st["conversation"]["playing"] == true);
        hold(1500);
        let pressed = Instant::now();
        key.key(KEY_F14, 1);
        hold(40); // a tap: shorter than 100 ms, so no new turn should follow
        key.key(KEY_F14, 0);
        g.wait_count("conversation.item.truncate", 1);
        assert_eq!(g.count("response.cancel"), 1);
        // Listen long enough to hear whether the sound stopped: the card's output up to
        // LISTEN_MS past the latest moment it may fall silent.
        let press_frame = speaker.frame_at(pressed).unwrap();
        let heard_until = press_frame + (SILENT_WITHIN_MS + LISTEN_MS) * 24;
        assert!(
            poll(T, || speaker.frames() >= heard_until),
            "the recording stopped at frame {} short of {heard_until}",
            speaker.frames()
        );
        let allowed = xruns(&g, PLAYBACK) + speaker.xruns() - before;
        let truncate = g.fake.events_of_type("conversation.item.truncate").remove(0);
        let end_ms = truncate["audio_end_ms"].as_u64().unwrap() as i64;
        // The fake records an event before it handles it, and publishes its state after.
        let mut st = Value::Null;
        assert!(poll(T, || {
            st = g.fake.state();
            !st["truncations"][0].is_null()
        }));
        assert_eq!(st["truncations"][0]["audio_end_ms"], end_ms, "accepted: {st}");

        let recorded = speaker.samples();
        let reply = speech(ANSWER_S * 24_000);
        let at = find(&recorded, &reply[..2400]).expect("the answer started playing");
        // If the tap became a turn (a starved test may hold the key past 100 ms), the next
        // answer starts from its beginning: the first one ends before it.
        let next_answer = at + 2400 + find(&recorded[at + 2400..], &reply[..2400]).unwrap_or(recorded.len() - at - 2400);
        // Silence may come between its samples where speech had not arrived yet (the
        // answer streams at four times real time, on a starved guest maybe slower).
        let got = follow(&recorded[..next_answer], at, &reply);
        let played_ms = got.matched as i64 / 24;
        let sent_ms = st["truncations"][0]["audio_sent_ms"].as_i64().unwrap_or(0);
        assert!(
            (200..(ANSWER_S as i64 - 1) * 1000).contains(&played_ms),
            "played {played_ms} ms: the cut is not in the middle of the answer"
        );
        // What the user hears: the card falls silent soon after the key goes down (a few
        // ms measured at rest, the figure reported below), long before the seconds of answer
        // walkie held would have run out. The bound is generous: it is not a speed check.
        let silent = speaker.time_of(got.end as u64).unwrap();
        let to_silence_ms = silent.saturating_duration_since(pressed).as_secs_f64() * 1000.0;
        assert!(
            to_silence_ms < SILENT_WITHIN_MS as f64 && (got.end as u64) < heard_until,
            "the card played on for {to_silence_ms:.0} ms after the press, to {played_ms} ms of \
             the answer ({sent_ms} ms of it sent; the truncation says {end_ms} ms; {allowed} \
             xrun(s)): {}",
            describe(&recorded, at, &reply)
        );
        // walkie takes the truncation point when it sees the press: the speech it has handed
        // the device by then. The drop takes effect at once, so the card never plays what was
        // still in the device buffer (four 10 ms periods at most), nor more than that point
        // (DROP_SLACK_MS for a playback thread that saw the drop late): the truncation says
        // what was heard, however late walkie saw the press. 20 ms for the timelines.
        assert!(
            (played_ms - DROP_SLACK_MS..=played_ms + 40 + 20).contains(&end_ms),
            "the truncation says {end_ms} ms, the card played {played_ms} ms and fell silent \
             {to_silence_ms:.0} ms after the press ({allowed} xrun(s)): {}",
            describe(&recorded, at, &reply)
        );
        // Silence after the cut, to the end of the recording or the next answer if there is
        // one.
        assert!(
            recorded[got.end..next_answer].iter().all(|&s| s == 0),
            "sound after the cut ({allowed} xrun(s)): {}",
            describe(&recorded, at, &reply)
        );

        // More presses into answers, for the measurement only.
        let mut latencies = vec![to_silence_ms];
        let mut from = next_answer.min(got.end);
        for round in 2..=6 {
            if g.status()["conversation"]["playing"] == true {
                g.wait_status("quiet", |st| st["conversation"]["playing"] == false);
            }
            g.say("and then?");
            g.wait_status("the answer playing", |st| st["conversation"]["playing"] == true);
            hold(800);
            let pressed = Instant::now();
            key.key(KEY_F14, 1);
            hold(40);
            key.key(KEY_F14, 0);
            g.wait_count("conversation.item.truncate", round);
            speaker.wait_recorded(Instant::now(), 300);
            let recorded = speaker.samples();
            let Some(start) = find(&recorded[from..], &reply[..2400]).map(|k| from + k) else {
                continue;
            };
            let next = start
                + 2400
                + find(&recorded[start + 2400..], &reply[..2400])
                    .unwrap_or(recorded.len() - start - 2400);
            let cut = follow(&recorded[..next], start, &reply).end;
            if let Some(silent) = speaker.time_of(cut as u64) {
                latencies.push(silent.saturating_duration_since(pressed).as_secs_f64() * 1000.0);
            }
            from = cut;
        }
        crate::vm::report(
            "a_press_during_the_answer_silences_the_card_where_the_truncation_says",
            json!({
                "button_to_silence_ms": spread(&mut latencies),
                "first": {"played_ms": played_ms, "audio_end_ms": end_ms},
                "playback_xruns": xruns(&g, PLAYBACK) + speaker.xruns() - before,
            }),
        );
    }
}

kernel_test! {
    fn a_card_at_48_and_16_khz_is_converted_by_the_plug_layer() {
        let tone: Vec<i16> = (0..24_000).map(|n| sine(1000.0, 24_000)(n)).collect();
        for rate in [48_000, 16_000] {
            let mic = Stream::play("hw:Loopback,0,2", rate, sine(1000.0, rate));
            let speaker = Stream::record("hw:Loopback,1,3", rate);
            // The whole answer arrives at once, so a gap in it can only be walkie's.
            let g = Guest::start(Setup {
                audio: Some(&alsa("plughw:Loopback,1,2", "plughw:Loopback,0,3", 20)),
                reply: Some(tone.clone()),
                fake_args: &["--speed", "50"],
                ..Setup::default()
            });
            let before = [xruns(&g, CAPTURE) + mic.xruns(), xruns(&g, PLAYBACK) + speaker.xruns()];
            hold(500);
            g.press();
            hold(800);
            g.release();
            g.wait_count("input_audio_buffer.commit", 1);
            g.wait_status("the answer playing", |st| st["conversation"]["playing"] == true);
            g.wait_status("the answer played", |st| st["conversation"]["playing"] == false);
            speaker.wait_recorded(Instant::now(), 300);
            let allowed = [
                xruns(&g, CAPTURE) + mic.xruns() - before[0],
                xruns(&g, PLAYBACK) + speaker.xruns() - before[1],
            ];

            // Captured at the card's rate, sent at 24 kHz: the same 1 kHz tone.
            let sent = g.appended_audio();
            let hz = frequency(&sent, 24_000);
            assert!(
                (980.0..=1020.0).contains(&hz),
                "{rate} Hz card: walkie sent a {hz:.0} Hz tone for a 1000 Hz one"
            );
            let quiet = dropouts(&sent[240..sent.len() - 240], 240);
            assert!(
                allowed[0] > 0 || quiet.is_empty(),
                "{rate} Hz card: the sent tone drops out at 10 ms windows {quiet:?} with {} \
                 capture xrun(s)",
                allowed[0]
            );

            // Played at 24 kHz, recorded at the card's rate: 1 s of the same tone.
            let recorded = speaker.samples();
            let loud = |s: &i16| s.unsigned_abs() > 3000;
            let from = recorded.iter().position(loud).expect("the answer reached the card");
            let to = recorded.iter().rposition(loud).unwrap();
            let seconds = (to - from) as f64 / f64::from(rate);
            // An underrun stretches it by however long the guest was starved.
            let window = (rate / 100) as usize;
            let peaks: Vec<u16> = recorded[from..=to]
                .chunks(window)
                .map(|c| c.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0))
                .collect();
            assert!(
                allowed[1] > 0 || (0.98..=1.02).contains(&seconds),
                "{rate} Hz card: a 1 s answer lasted {seconds:.3} s; peaks per 10 ms: {peaks:?}"
            );
            let hz = frequency(&recorded[from..to], rate);
            assert!(
                (980.0..=1020.0).contains(&hz),
                "{rate} Hz card: a 1000 Hz answer played at {hz:.0} Hz"
            );
            let quiet = dropouts(&recorded[from..to], (rate / 100) as usize);
            assert!(
                allowed[1] > 0 || quiet.is_empty(),
                "{rate} Hz card: the answer drops out at 10 ms windows {quiet:?} with {} \
                 playback xrun(s)",
                allowed[1]
            );
        }
    }
}

/// The `window`s of `samples` without signal (a 1 kHz tone peaks in every 10 ms).
fn dropouts(samples: &[i16], window: usize) -> Vec<usize> {
    samples
        .chunks(window)
        .enumerate()
        .filter(|(_, c)| c.len() >= window / 2 && c.iter().all(|s| s.unsigned_abs() <= 5000))
        .map(|(i, _)| i)
        .collect()
}

kernel_test! {
    fn a_raw_hw_device_at_another_rate_is_refused_with_the_plug_hint() {
        let _mic = Stream::play("hw:Loopback,0,4", 48_000, sine(1000.0, 48_000));
        let g = Guest::start(Setup {
            audio: Some(&alsa("hw:Loopback,1,4", SPEAKER_OUT, 10)),
            wait_audio: false,
            ..Setup::default()
        });
        let st = g.wait_status("the capture device refused, the speaker open", |st| {
            st["audio"]["capture"]["state"] == "failed" && st["audio"]["playback"]["state"] == "ok"
        });
        let error = st["audio"]["capture"]["error"].as_str().unwrap_or("");
        assert!(
            error.contains("hw:Loopback,1,4") && error.contains("24000") && error.contains("plug"),
            "{error}"
        );
        assert_eq!(st["audio"]["playback"]["state"], "ok", "{st}");
    }
}

/// A write to a sysfs file on its own thread: unbinding a sound card blocks in the kernel
/// until every file on the card is closed, so the test waits with a time limit.
struct SysfsWrite {
    done: std::sync::mpsc::Receiver<Result<(), String>>,
    started: Instant,
}

impl SysfsWrite {
    fn start(path: &str, value: &str) -> SysfsWrite {
        let (tx, done) = std::sync::mpsc::channel();
        let (path, value) = (path.to_owned(), value.to_owned());
        std::thread::spawn(move || {
            let _ = tx.send(std::fs::write(&path, &value).map_err(|e| format!("{path}: {e}")));
        });
        SysfsWrite {
            done,
            started: Instant::now(),
        }
    }

    /// How long it took, or why it did not finish within `limit`.
    fn wait(&self, limit: Duration) -> Result<Duration, String> {
        match self.done.recv_timeout(limit) {
            Ok(Ok(())) => Ok(self.started.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("still blocked after {limit:?}")),
        }
    }
}

const ALOOP_DRIVER: &str = "/sys/bus/platform/drivers/snd_aloop";

kernel_test! {
    fn the_card_going_away_fails_the_audio_only_and_it_comes_back() {
        let mic = Stream::play(MIC_OUT, 24_000, |n| pattern(n as usize));
        let g = Guest::start(Setup {
            audio: Some(&alsa(MIC_IN, SPEAKER_OUT, 10)),
            ..Setup::default()
        });
        let unbind = SysfsWrite::start(&format!("{ALOOP_DRIVER}/unbind"), "snd_aloop.0");
        let took = match unbind.wait(Duration::from_secs(20)) {
            Ok(took) => took,
            Err(e) => {
                // Something keeps a file on the card open. Kill walkie so the card can go
                // and come back for the tests that follow, then fail.
                g.w.signal(nix::sys::signal::Signal::SIGKILL);
                let after_kill = unbind.wait(Duration::from_secs(20));
                let bind = SysfsWrite::start(&format!("{ALOOP_DRIVER}/bind"), "snd_aloop.0");
                let _ = bind.wait(Duration::from_secs(20));
                panic!(
                    "unbinding the card: {e}; with walkie killed: {after_kill:?}. walkie kept \
                     a file on the card open"
                );
            }
        };
        assert!(!Path::new("/proc/asound/Loopback").exists(), "the card is gone");
        let st = g.wait_status("the audio failed", |st| {
            st["audio"]["state"] == "failed"
                && st["audio"]["capture"]["state"] == "failed"
                && st["audio"]["playback"]["state"] == "failed"
        });
        assert!(st["audio"]["error"].as_str().unwrap_or("").contains(MIC_IN), "{st}");

        // Tasks and the link do not notice.
        let name = g.w.start_task(&["@sleep=0.2"]);
        assert_eq!(g.w.wait_finished(&name, T)["state"], "succeeded");
        assert_eq!(g.status()["link"], "connected");
        g.say("are you still there");
        g.wait_count("response.create", 1);
        g.wait_status("the answer spoken to nobody", |st| {
            st["conversation"]["playing"] == false && st["conversation"]["active_response"].is_null()
        });

        SysfsWrite::start(&format!("{ALOOP_DRIVER}/bind"), "snd_aloop.0")
            .wait(Duration::from_secs(20))
            .expect("bind the card");
        g.wait_status("the audio back", |st| st["audio"]["state"] == "ok");
        assert!(poll(T, || mic.opens() >= 2), "the test's player reopened");
        hold(600);
        let before = xruns(&g, CAPTURE) + mic.xruns();
        g.press();
        hold(600);
        g.release();
        g.wait_count("input_audio_buffer.commit", 1);
        let allowed = xruns(&g, CAPTURE) + mic.xruns() - before;
        let audio = g.appended_audio();
        let breaks = pattern_breaks(&audio);
        assert!(
            breaks.len() as u64 <= allowed,
            "the turn after the card returned breaks at {breaks:?} with {allowed} xrun(s)"
        );
        assert!(audio.len() >= 600 * 24, "{} ms of audio", audio.len() / 24);
        crate::vm::report(
            "the_card_going_away_fails_the_audio_only_and_it_comes_back",
            json!({"unbind_returned_after_ms": took.as_millis()}),
        );
    }
}

kernel_test! {
    fn an_overrun_from_a_stopped_reader_is_recovered() {
        let mic = Stream::play(MIC_OUT, 24_000, |n| pattern(n as usize));
        // A silent answer: a sounding one would (rightly) keep its echo out of the next
        // turn's pre-roll, which this test reads as one piece.
        let g = Guest::start(Setup {
            audio: Some(&alsa(MIC_IN, SPEAKER_OUT, 10)),
            reply: Some(vec![0; 2400]),
            ..Setup::default()
        });
        let before = xruns(&g, CAPTURE) + mic.xruns();
        g.press();
        hold(300);
        // walkie stops reading for longer than its capture buffer holds.
        g.pause(true);
        hold(1000);
        g.pause(false);
        let st = g.wait_status("a capture overrun counted", |st| {
            st["audio"]["capture"]["xruns"].as_u64() >= Some(1)
        });
        assert_eq!(st["audio"]["capture"]["state"], "ok", "{st}");
        hold(500);
        g.release();
        g.wait_count("input_audio_buffer.commit", 1);
        let forced = xruns(&g, CAPTURE) + mic.xruns();
        let audio = g.appended_audio();
        // The overrun cut the turn once; after it the audio runs on.
        let breaks = pattern_breaks(&audio);
        assert!(!breaks.is_empty(), "a second of audio was lost, the turn cannot be whole");
        // The next turn is whole (or broken only where another xrun was counted).
        hold(300);
        g.press();
        hold(500);
        g.release();
        g.wait_count("input_audio_buffer.commit", 2);
        let allowed = xruns(&g, CAPTURE) + mic.xruns() - forced;
        let next = &g.appended_audio()[audio.len()..];
        let next_breaks = pattern_breaks(next);
        assert!(
            next_breaks.len() as u64 <= allowed,
            "the next turn breaks at {next_breaks:?} with {allowed} xrun(s)"
        );
        assert!(
            breaks.len() as u64 <= forced - before,
            "the turn with the overrun breaks at {breaks:?}, more than the {} xrun(s) counted",
            forced - before
        );
        let log = g.w.log();
        assert!(log.contains("capture xrun, recovered"), "reported:\n{log}");
        assert!(!log.contains("stopped working"), "the device was not reopened:\n{log}");
    }
}
