//! WAV files for the `wav` backend: a reader that turns any PCM WAV into walkie's
//! 24 kHz mono s16, and an append-only writer whose header stays valid while it grows.
//!
//! The reader runs when the capture thread opens its "device" (outside the period loop);
//! the writer belongs to the `walkie-wav-out` thread, which drains what the playback thread
//! "played" and rewrites the header sizes about once a second and when it stops, so the
//! file is a valid WAV at every moment (its header may only lag behind the data).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::voice::SAMPLE_RATE;

/// Why a WAV input could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WavError {
    /// The file cannot be read (missing, no permission). The caller reports it and tries
    /// again later: the file may appear.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not a RIFF/WAVE file, or a truncated or inconsistent one. The caller reports it.
    #[error("{}: not a usable WAV file: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    /// A valid WAV in an encoding walkie does not convert (compressed, odd sample sizes).
    /// The caller reports it; the user converts the file (e.g. `sox in.wav -b16 out.wav`).
    #[error("{}: unsupported WAV encoding: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
}

/// The encoding found in a WAV header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavFormat {
    pub channels: u16,
    pub sample_rate: u32,
    pub bits_per_sample: u16,
    pub float: bool,
}

const WAVE_FORMAT_PCM: u16 = 1;
const WAVE_FORMAT_IEEE_FLOAT: u16 = 3;
const WAVE_FORMAT_EXTENSIBLE: u16 = 0xFFFE;

/// Reads `path` and converts it to 24 kHz mono s16 (channels averaged, rate converted by
/// linear interpolation).
/// Only a regular file of at most [`MAX_WAV_FILE`] is read: a FIFO would block the open or
/// the read, and `/dev/zero` never ends.
pub fn read_wav(path: &Path) -> Result<(WavFormat, Vec<i16>), WavError> {
    let bytes = crate::files::read_capped(path, MAX_WAV_FILE).map_err(|source| WavError::Io {
        path: path.to_owned(),
        source,
    })?;
    decode(&bytes).map_err(|e| match e {
        DecodeError::Malformed(reason) => WavError::Malformed {
            path: path.to_owned(),
            reason,
        },
        DecodeError::Unsupported(what) => WavError::Unsupported {
            path: path.to_owned(),
            what,
        },
    })
}

/// The largest WAV file [`read_wav`] reads: 256 MiB, 45 minutes of 48 kHz stereo s16 (a
/// file to play into the microphone, not an archive).
pub const MAX_WAV_FILE: u64 = 256 << 20;

/// [`read_wav`] without the file: errors carry no path.
#[derive(Debug, PartialEq)]
pub enum DecodeError {
    Malformed(String),
    Unsupported(String),
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses a WAV image and converts it to 24 kHz mono s16.
pub fn decode(bytes: &[u8]) -> Result<(WavFormat, Vec<i16>), DecodeError> {
    let bad = |r: &str| DecodeError::Malformed(r.to_owned());
    if bytes.get(0..4) != Some(b"RIFF") || bytes.get(8..12) != Some(b"WAVE") {
        return Err(bad("no RIFF/WAVE signature"));
    }
    let mut at = 12;
    let mut format: Option<WavFormat> = None;
    let mut data: Option<&[u8]> = None;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let size = le32(bytes, at + 4).ok_or_else(|| bad("truncated chunk header"))? as usize;
        let body_start = at + 8;
        // Writers that stream (like ours between header updates, or `arecord` killed
        // mid-way) may claim less or more than is there: take what exists.
        let body_end = body_start.saturating_add(size).min(bytes.len());
        let body = &bytes[body_start..body_end];
        match id {
            b"fmt " => format = Some(parse_fmt(body)?),
            b"data" => {
                data = Some(body);
                break;
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        at = body_start.saturating_add(size).saturating_add(size & 1);
    }
    let format = format.ok_or_else(|| bad("no fmt chunk before the data"))?;
    let data = data.ok_or_else(|| bad("no data chunk"))?;
    Ok((format, convert(format, data)))
}

fn parse_fmt(body: &[u8]) -> Result<WavFormat, DecodeError> {
    let short = || DecodeError::Malformed("fmt chunk too short".to_owned());
    let mut tag = le16(body, 0).ok_or_else(short)?;
    let channels = le16(body, 2).ok_or_else(short)?;
    let sample_rate = le32(body, 4).ok_or_else(short)?;
    let bits_per_sample = le16(body, 14).ok_or_else(short)?;
    if tag == WAVE_FORMAT_EXTENSIBLE {
        // The real format tag is the first two bytes of the sub-format GUID.
        tag = le16(body, 24).ok_or_else(short)?;
    }
    let float = match tag {
        WAVE_FORMAT_PCM => false,
        WAVE_FORMAT_IEEE_FLOAT => true,
        other => {
            return Err(DecodeError::Unsupported(format!(
                "format tag {other:#06x} (only PCM and IEEE float)"
            )));
        }
    };
    let supported = if float {
        matches!(bits_per_sample, 32 | 64)
    } else {
        matches!(bits_per_sample, 8 | 16 | 24 | 32)
    };
    if !supported {
        return Err(DecodeError::Unsupported(format!(
            "{bits_per_sample}-bit {}",
            if float { "float" } else { "integer" }
        )));
    }
    if channels == 0 || sample_rate == 0 {
        return Err(DecodeError::Malformed(
            "zero channels or zero sample rate".to_owned(),
        ));
    }
    Ok(WavFormat {
        channels,
        sample_rate,
        bits_per_sample,
        float,
    })
}

/// One sample as a value in [-32768, 32767] (as f64, so averaging and interpolation need
/// no special cases).
fn sample(format: WavFormat, b: &[u8]) -> f64 {
    match (format.float, format.bits_per_sample) {
        (false, 8) => (f64::from(b[0]) - 128.0) * 256.0,
        (false, 16) => f64::from(i16::from_le_bytes([b[0], b[1]])),
        (false, 24) => f64::from(i32::from_le_bytes([0, b[0], b[1], b[2]]) >> 8) / 256.0,
        (false, _) => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])) / 65_536.0,
        (true, 32) => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])) * 32_768.0,
        (true, _) => {
            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) * 32_768.0
        }
    }
}

fn to_i16(v: f64) -> i16 {
    v.round().clamp(-32_768.0, 32_767.0) as i16
}

fn convert(format: WavFormat, data: &[u8]) -> Vec<i16> {
    let width = usize::from(format.bits_per_sample / 8);
    let channels = usize::from(format.channels);
    let frame = width * channels;
    let mono: Vec<f64> = data
        .chunks_exact(frame)
        .map(|f| {
            let sum: f64 = f.chunks_exact(width).map(|s| sample(format, s)).sum();
            sum / channels as f64
        })
        .collect();
    if format.sample_rate == SAMPLE_RATE {
        return mono.into_iter().map(to_i16).collect();
    }
    resample_linear(&mono, format.sample_rate, SAMPLE_RATE)
}

fn resample_linear(input: &[f64], from: u32, to: u32) -> Vec<i16> {
    if input.is_empty() {
        return Vec::new();
    }
    let out_len = (input.len() as u64 * u64::from(to) / u64::from(from)) as usize;
    let step = f64::from(from) / f64::from(to);
    (0..out_len)
        .map(|i| {
            let pos = i as f64 * step;
            let k = pos.floor() as usize;
            let frac = pos - k as f64;
            let a = input[k.min(input.len() - 1)];
            let b = input[(k + 1).min(input.len() - 1)];
            to_i16(a + (b - a) * frac)
        })
        .collect()
}

/// The 44-byte header of a 24 kHz mono s16 WAV whose data chunk holds `data_bytes`.
pub fn header(data_bytes: u32) -> [u8; 44] {
    let mut h = [0u8; 44];
    let byte_rate = SAMPLE_RATE * 2;
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&data_bytes.saturating_add(36).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&WAVE_FORMAT_PCM.to_le_bytes());
    h[22..24].copy_from_slice(&1u16.to_le_bytes());
    h[24..28].copy_from_slice(&SAMPLE_RATE.to_le_bytes());
    h[28..32].copy_from_slice(&byte_rate.to_le_bytes());
    h[32..34].copy_from_slice(&2u16.to_le_bytes());
    h[34..36].copy_from_slice(&16u16.to_le_bytes());
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data_bytes.to_le_bytes());
    h
}

/// Largest data chunk a WAV header can describe (sizes are 32-bit), rounded to whole frames.
const MAX_DATA_BYTES: u64 = (u32::MAX as u64 - 36) & !1;

/// An append-only 24 kHz mono s16 WAV file.
#[derive(Debug)]
pub struct WavWriter {
    file: File,
    data_bytes: u64,
    scratch: Vec<u8>,
}

impl WavWriter {
    /// Creates (truncates) `path` and writes a header for an empty data chunk. What is
    /// there already must be a regular file: a FIFO would block the open or every write,
    /// a device would take the audio somewhere else. A new file is private (0600): it holds
    /// what was said.
    pub fn create(path: &Path) -> io::Result<WavWriter> {
        if let Ok(meta) = std::fs::metadata(path) {
            crate::files::check_regular(&meta)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)?;
        // The check that counts is on what was opened: the path may have changed meanwhile.
        crate::files::check_regular(&file.metadata()?)?;
        file.write_all(&header(0))?;
        Ok(WavWriter {
            file,
            data_bytes: 0,
            scratch: Vec::new(),
        })
    }

    /// Appends samples. Beyond the 4 GiB a header can describe (about 24 hours) the rest
    /// is dropped, so the file stays valid.
    pub fn append(&mut self, samples: &[i16]) -> io::Result<()> {
        let room = (MAX_DATA_BYTES - self.data_bytes) / 2;
        let n = samples
            .len()
            .min(usize::try_from(room).unwrap_or(usize::MAX));
        self.scratch.clear();
        for s in &samples[..n] {
            self.scratch.extend_from_slice(&s.to_le_bytes());
        }
        self.file.write_all(&self.scratch)?;
        self.data_bytes += self.scratch.len() as u64;
        Ok(())
    }

    /// Rewrites the header sizes to cover everything appended so far.
    pub fn update_header(&mut self) -> io::Result<()> {
        let h = header(self.data_bytes as u32);
        self.file.write_all_at(&h[4..8], 4)?;
        self.file.write_all_at(&h[40..44], 40)?;
        Ok(())
    }

    /// Frames appended so far.
    pub fn frames(&self) -> u64 {
        self.data_bytes / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav_image(tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"RIFF");
        v.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        v.extend_from_slice(b"WAVE");
        v.extend_from_slice(b"fmt ");
        v.extend_from_slice(&16u32.to_le_bytes());
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&channels.to_le_bytes());
        v.extend_from_slice(&rate.to_le_bytes());
        let align = channels * bits / 8;
        v.extend_from_slice(&(rate * u32::from(align)).to_le_bytes());
        v.extend_from_slice(&align.to_le_bytes());
        v.extend_from_slice(&bits.to_le_bytes());
        // An unknown chunk before the data must be skipped (odd size: padded).
        v.extend_from_slice(b"LIST");
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&[1, 2, 3, 0]);
        v.extend_from_slice(b"data");
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    fn s16(samples: &[i16]) -> Vec<u8> {
        samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    #[test]
    fn reads_native_format_exactly() {
        let samples: Vec<i16> = vec![0, 1, -1, 32767, -32768, 1234];
        let img = wav_image(1, 1, 24_000, 16, &s16(&samples));
        let (fmt, out) = decode(&img).expect("decode");
        assert_eq!(fmt.sample_rate, 24_000);
        assert_eq!(out, samples);
    }

    #[test]
    fn downmixes_stereo_by_averaging() {
        let img = wav_image(1, 2, 24_000, 16, &s16(&[100, 300, -50, -150, 7, 7]));
        let (_, out) = decode(&img).expect("decode");
        assert_eq!(out, vec![200, -100, 7]);
    }

    #[test]
    fn converts_rate_by_interpolation() {
        // 12 kHz ramp → 24 kHz: twice the frames, midpoints interpolated.
        let img = wav_image(1, 1, 12_000, 16, &s16(&[0, 100, 200, 300]));
        let (_, out) = decode(&img).expect("decode");
        assert_eq!(out, vec![0, 50, 100, 150, 200, 250, 300, 300]);
        // 48 kHz → 24 kHz: every other frame.
        let img = wav_image(1, 1, 48_000, 16, &s16(&[0, 1, 2, 3, 4, 5]));
        let (_, out) = decode(&img).expect("decode");
        assert_eq!(out, vec![0, 2, 4]);
    }

    #[test]
    fn converts_other_sample_formats() {
        let u8_img = wav_image(1, 1, 24_000, 8, &[128, 255, 0]);
        assert_eq!(decode(&u8_img).expect("u8").1, vec![0, 32512, -32768]);
        let s24: Vec<u8> = [0x000100i32, -256]
            .iter()
            .flat_map(|v| v.to_le_bytes()[..3].to_vec())
            .collect();
        assert_eq!(
            decode(&wav_image(1, 1, 24_000, 24, &s24)).expect("s24").1,
            vec![1, -1]
        );
        let f32s: Vec<u8> = [0.5f32, -1.0, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            decode(&wav_image(3, 1, 24_000, 32, &f32s)).expect("f32").1,
            vec![16384, -32768, 32767]
        );
    }

    #[test]
    fn refuses_what_it_cannot_convert() {
        assert!(matches!(
            decode(b"RIFX\0\0\0\0WAVE"),
            Err(DecodeError::Malformed(_))
        ));
        let adpcm = wav_image(2, 1, 24_000, 4, &[0; 8]);
        assert!(matches!(decode(&adpcm), Err(DecodeError::Unsupported(_))));
        let mut no_data = wav_image(1, 1, 24_000, 16, &[]);
        no_data.truncate(36);
        assert!(matches!(decode(&no_data), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn only_a_regular_file_of_bounded_size_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("mic.wav");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // A FIFO with no writer would block the open (and a writer that never ends the read).
        let error = read_wav(&fifo).expect_err("a FIFO is refused").to_string();
        assert!(error.contains("FIFO"), "{error}");
        let error = read_wav(Path::new("/dev/zero"))
            .expect_err("a device is refused")
            .to_string();
        assert!(error.contains("/dev/zero"), "{error}");
        let big = dir.path().join("big.wav");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_WAV_FILE + 1)
            .unwrap();
        let error = read_wav(&big).expect_err("too large").to_string();
        assert!(error.contains("big.wav"), "{error}");
    }

    #[test]
    fn the_writer_refuses_a_fifo_and_makes_a_private_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("out.wav");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let error = WavWriter::create(&fifo).expect_err("a FIFO is refused");
        assert!(error.to_string().contains("FIFO"), "{error}");
        let path = dir.path().join("new.wav");
        // Not the usual 0644 of a new file: what was said stays private.
        WavWriter::create(&path).expect("create");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn writer_output_is_valid_at_every_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.wav");
        let mut w = WavWriter::create(&path).expect("create");
        let read = || decode(&std::fs::read(&path).expect("read")).expect("valid wav");
        assert_eq!(read().1, Vec::<i16>::new());
        w.append(&[1, 2, 3]).expect("append");
        // Before the header is updated the file is still valid (it just claims less).
        assert_eq!(read().1, Vec::<i16>::new());
        w.update_header().expect("header");
        assert_eq!(read().1, vec![1, 2, 3]);
        w.append(&[-4, 5]).expect("append");
        w.update_header().expect("header");
        let (fmt, samples) = read();
        assert_eq!(samples, vec![1, 2, 3, -4, 5]);
        assert_eq!(
            fmt,
            WavFormat {
                channels: 1,
                sample_rate: 24_000,
                bits_per_sample: 16,
                float: false
            }
        );
        assert_eq!(w.frames(), 5);
        let len = std::fs::metadata(&path).expect("meta").len();
        assert_eq!(len, 44 + 10);
    }
}
