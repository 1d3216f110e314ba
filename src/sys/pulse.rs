//! PulseAudio's client library (libpulse), loaded with `dlopen` the first time it is needed
//! rather than linked: walkie builds without its headers, and a machine on the ALSA backend
//! never maps it (about 3 MiB with its dependencies). Only what the capture thread needs:
//! one record stream on libpulse's plain (non-threaded) main loop, driven by the caller's
//! thread. See `audio/pulse.rs` for why.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::voice::SAMPLE_RATE;

/// How long opening (connect, create the stream) may take before it counts as failed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an open that waits for the server asks whether to give up.
const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// The error of an open given up on (walkie is stopping).
const CANCELLED: &str = "PulseAudio open given up: walkie is stopping";

const PA_CONTEXT_NOAUTOSPAWN: c_int = 1;
const PA_CONTEXT_READY: c_int = 4;
const PA_CONTEXT_FAILED: c_int = 5;
const PA_CONTEXT_TERMINATED: c_int = 6;
const PA_STREAM_READY: c_int = 2;
const PA_STREAM_FAILED: c_int = 3;
const PA_STREAM_TERMINATED: c_int = 4;
const PA_SAMPLE_S16LE: c_int = 3;
/// The server sets the source's latency from the fragment size (and re-sets it when the
/// fragment size changes), rather than only batching what the source delivers.
const PA_STREAM_ADJUST_LATENCY: c_int = 0x2000;
/// A stream recording from a named source stays on it: when the source goes away the
/// server kills the stream (walkie says so and waits for it to return) instead of moving
/// it to another source, which would go on "recording" whatever that one hears.
const PA_STREAM_DONT_MOVE: c_int = 0x0200;

#[repr(C)]
struct SampleSpec {
    format: c_int,
    rate: u32,
    channels: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct BufferAttr {
    maxlength: u32,
    tlength: u32,
    prebuf: u32,
    minreq: u32,
    fragsize: u32,
}

type Opaque = c_void;

/// The libpulse functions walkie calls, resolved once.
struct Lib {
    mainloop_new: unsafe extern "C" fn() -> *mut Opaque,
    mainloop_free: unsafe extern "C" fn(*mut Opaque),
    mainloop_get_api: unsafe extern "C" fn(*mut Opaque) -> *mut Opaque,
    mainloop_prepare: unsafe extern "C" fn(*mut Opaque, c_int) -> c_int,
    mainloop_poll: unsafe extern "C" fn(*mut Opaque) -> c_int,
    mainloop_dispatch: unsafe extern "C" fn(*mut Opaque) -> c_int,
    mainloop_iterate: unsafe extern "C" fn(*mut Opaque, c_int, *mut c_int) -> c_int,
    context_new: unsafe extern "C" fn(*mut Opaque, *const c_char) -> *mut Opaque,
    context_connect:
        unsafe extern "C" fn(*mut Opaque, *const c_char, c_int, *const c_void) -> c_int,
    context_get_state: unsafe extern "C" fn(*const Opaque) -> c_int,
    context_errno: unsafe extern "C" fn(*const Opaque) -> c_int,
    context_disconnect: unsafe extern "C" fn(*mut Opaque),
    context_unref: unsafe extern "C" fn(*mut Opaque),
    strerror: unsafe extern "C" fn(c_int) -> *const c_char,
    stream_new: unsafe extern "C" fn(
        *mut Opaque,
        *const c_char,
        *const SampleSpec,
        *const c_void,
    ) -> *mut Opaque,
    stream_connect_record:
        unsafe extern "C" fn(*mut Opaque, *const c_char, *const BufferAttr, c_int) -> c_int,
    stream_get_state: unsafe extern "C" fn(*const Opaque) -> c_int,
    stream_peek: unsafe extern "C" fn(*mut Opaque, *mut *const c_void, *mut usize) -> c_int,
    stream_drop: unsafe extern "C" fn(*mut Opaque) -> c_int,
    stream_readable_size: unsafe extern "C" fn(*const Opaque) -> usize,
    stream_set_buffer_attr: unsafe extern "C" fn(
        *mut Opaque,
        *const BufferAttr,
        *const c_void,
        *mut c_void,
    ) -> *mut Opaque,
    stream_get_device_name: unsafe extern "C" fn(*const Opaque) -> *const c_char,
    stream_disconnect: unsafe extern "C" fn(*mut Opaque) -> c_int,
    stream_unref: unsafe extern "C" fn(*mut Opaque),
    operation_unref: unsafe extern "C" fn(*mut Opaque),
}

/// The library's soname: what Debian's `libpulse0` (and PipeWire's `pipewire-pulse` setups,
/// which keep the same client library) install.
const LIBRARY: &CStr = c"libpulse.so.0";

fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated message owned by libc.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: checked non-null above.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

fn load() -> Result<Lib, String> {
    // SAFETY: dlopen with a constant name; the handle is never closed (the functions below
    // stay valid for the life of the process).
    let handle = unsafe { libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!(
            "audio.backend \"pulse\" needs PulseAudio's client library (libpulse.so.0; Debian: \
             apt install libpulse0): {}",
            dlerror()
        ));
    }
    macro_rules! sym {
        ($name:literal) => {{
            // SAFETY: a valid handle and a NUL-terminated literal.
            let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
            if p.is_null() {
                return Err(format!("libpulse.so.0 has no {}: {}", $name, dlerror()));
            }
            // SAFETY: a function pointer is pointer-sized, and the field's type is the
            // signature libpulse's headers declare for the symbol (pulse/*.h; the ABI has
            // been stable since 0.9).
            unsafe { std::mem::transmute_copy::<*mut c_void, _>(&p) }
        }};
    }
    Ok(Lib {
        mainloop_new: sym!("pa_mainloop_new"),
        mainloop_free: sym!("pa_mainloop_free"),
        mainloop_get_api: sym!("pa_mainloop_get_api"),
        mainloop_prepare: sym!("pa_mainloop_prepare"),
        mainloop_poll: sym!("pa_mainloop_poll"),
        mainloop_dispatch: sym!("pa_mainloop_dispatch"),
        mainloop_iterate: sym!("pa_mainloop_iterate"),
        context_new: sym!("pa_context_new"),
        context_connect: sym!("pa_context_connect"),
        context_get_state: sym!("pa_context_get_state"),
        context_errno: sym!("pa_context_errno"),
        context_disconnect: sym!("pa_context_disconnect"),
        context_unref: sym!("pa_context_unref"),
        strerror: sym!("pa_strerror"),
        stream_new: sym!("pa_stream_new"),
        stream_connect_record: sym!("pa_stream_connect_record"),
        stream_get_state: sym!("pa_stream_get_state"),
        stream_peek: sym!("pa_stream_peek"),
        stream_drop: sym!("pa_stream_drop"),
        stream_readable_size: sym!("pa_stream_readable_size"),
        stream_set_buffer_attr: sym!("pa_stream_set_buffer_attr"),
        stream_get_device_name: sym!("pa_stream_get_device_name"),
        stream_disconnect: sym!("pa_stream_disconnect"),
        stream_unref: sym!("pa_stream_unref"),
        operation_unref: sym!("pa_operation_unref"),
    })
}

/// Bytes of `d` of 24 kHz mono S16.
pub fn bytes_for(d: Duration) -> u32 {
    let frames = d.as_micros() as u64 * u64::from(SAMPLE_RATE) / 1_000_000;
    u32::try_from(frames * 2).unwrap_or(u32::MAX)
}

/// What went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The connection to the server (it stopped or restarted).
    Server,
    /// The stream, on a connection still up: the server killed it (its source went away).
    Stream,
}

/// A PulseAudio record stream at 24 kHz mono S16 and the connection and main loop it lives
/// on, all used from the thread that opened it.
pub struct Record {
    lib: &'static Lib,
    mainloop: *mut Opaque,
    context: *mut Opaque,
    stream: *mut Opaque,
    /// Bytes of the fragment at the head of the stream's queue already copied out.
    offset: usize,
    /// `maxlength`: what the server keeps unread at most.
    max_bytes: u32,
}

impl Record {
    /// Connects to the server (`$PULSE_SERVER`, else libpulse's own lookup; never starts
    /// one) and records from `source` (None: the server's default source, followed when it
    /// changes; a named source is kept, never moved from), asking for
    /// fragments of `fragment_bytes`, the server keeping at most `max_bytes` unread. Blocks
    /// up to [`OPEN_TIMEOUT`], or until `cancelled` says to give up (asked every
    /// [`CANCEL_CHECK`]; a server that accepts the connection and never answers must not
    /// hold walkie's stop).
    pub fn open(
        source: Option<&str>,
        fragment_bytes: u32,
        max_bytes: u32,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Record, String> {
        let device = match source {
            None => None,
            Some(name) => Some(
                CString::new(name)
                    .map_err(|_| format!("invalid PulseAudio source name {name:?}"))?,
            ),
        };
        let lib = lib()?;
        // SAFETY: plain constructor; freed in Drop.
        let mainloop = unsafe { (lib.mainloop_new)() };
        if mainloop.is_null() {
            return Err("cannot create a PulseAudio main loop".into());
        }
        let mut me = Record {
            lib,
            mainloop,
            context: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            offset: 0,
            max_bytes,
        };
        // SAFETY: a valid main loop; the name is a NUL-terminated literal (libpulse copies).
        me.context =
            unsafe { (lib.context_new)((lib.mainloop_get_api)(mainloop), c"walkie".as_ptr()) };
        if me.context.is_null() {
            return Err("cannot create a PulseAudio context".into());
        }
        // SAFETY: a valid context; NULL server means libpulse's own lookup. No autospawn:
        // a service must not start a sound server of its own.
        let r = unsafe {
            (lib.context_connect)(
                me.context,
                std::ptr::null(),
                PA_CONTEXT_NOAUTOSPAWN,
                std::ptr::null(),
            )
        };
        if r < 0 {
            return Err(me.connect_error());
        }
        let deadline = Instant::now() + OPEN_TIMEOUT;
        loop {
            // SAFETY: a valid context.
            match unsafe { (lib.context_get_state)(me.context) } {
                PA_CONTEXT_READY => break,
                PA_CONTEXT_FAILED | PA_CONTEXT_TERMINATED => return Err(me.connect_error()),
                _ => me.iterate_until(deadline, cancelled)?,
            }
        }
        let spec = SampleSpec {
            format: PA_SAMPLE_S16LE,
            rate: SAMPLE_RATE,
            channels: 1,
        };
        // SAFETY: a ready context; spec and name are copied; a NULL channel map is the
        // default one for one channel (mono).
        me.stream = unsafe {
            (lib.stream_new)(
                me.context,
                c"walkie microphone".as_ptr(),
                &spec,
                std::ptr::null(),
            )
        };
        if me.stream.is_null() {
            return Err(format!(
                "cannot create a PulseAudio record stream: {}",
                me.error_text()
            ));
        }
        let attr = attr(fragment_bytes, max_bytes);
        // SAFETY: a fresh stream; attr and device name are copied.
        let r = unsafe {
            (lib.stream_connect_record)(
                me.stream,
                device.as_ref().map_or(std::ptr::null(), |d| d.as_ptr()),
                &attr,
                if device.is_some() {
                    PA_STREAM_ADJUST_LATENCY | PA_STREAM_DONT_MOVE
                } else {
                    PA_STREAM_ADJUST_LATENCY
                },
            )
        };
        if r < 0 {
            return Err(me.record_error(source));
        }
        loop {
            // SAFETY: a valid stream.
            match unsafe { (lib.stream_get_state)(me.stream) } {
                PA_STREAM_READY => return Ok(me),
                PA_STREAM_FAILED | PA_STREAM_TERMINATED => return Err(me.record_error(source)),
                _ => me.iterate_until(deadline, cancelled)?,
            }
        }
    }

    /// The source the server connected the stream to (the default source's real name).
    pub fn device_name(&self) -> Option<String> {
        // SAFETY: a ready stream; the string belongs to the stream and is copied at once.
        let p = unsafe { (self.lib.stream_get_device_name)(self.stream) };
        if p.is_null() {
            return None;
        }
        // SAFETY: checked non-null, NUL-terminated.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// One main-loop iteration, waiting at most until `deadline` (opening only).
    fn iterate_until(
        &mut self,
        deadline: Instant,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), String> {
        if cancelled() {
            return Err(CANCELLED.into());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "PulseAudio did not answer within {} s",
                OPEN_TIMEOUT.as_secs()
            ));
        }
        let us = left.min(CANCEL_CHECK).as_micros() as c_int;
        if self.iterate_for(us) {
            Ok(())
        } else {
            Err(format!(
                "PulseAudio main loop failed: {}",
                self.error_text()
            ))
        }
    }

    /// Prepare (waiting at most `us` microseconds), poll, dispatch.
    fn iterate_for(&mut self, us: c_int) -> bool {
        // SAFETY: a valid main loop, used from this thread only.
        unsafe {
            (self.lib.mainloop_prepare)(self.mainloop, us) >= 0
                && (self.lib.mainloop_poll)(self.mainloop) >= 0
                && (self.lib.mainloop_dispatch)(self.mainloop) >= 0
        }
    }

    fn error_text(&self) -> String {
        // SAFETY: a valid context; pa_strerror returns a static string (or NULL).
        let code = unsafe { (self.lib.context_errno)(self.context) };
        // SAFETY: as above.
        let p = unsafe { (self.lib.strerror)(code) };
        if p.is_null() {
            format!("error {code}")
        } else {
            // SAFETY: checked non-null.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    }

    fn connect_error(&self) -> String {
        let server = std::env::var("PULSE_SERVER").unwrap_or_else(|_| "the user's".into());
        format!(
            "cannot connect to PulseAudio (server: {server}): {}",
            self.error_text()
        )
    }

    fn record_error(&self, source: Option<&str>) -> String {
        format!(
            "PulseAudio cannot record from {}: {} (`pactl list short sources` lists them)",
            source.unwrap_or("the default source"),
            self.error_text()
        )
    }

    /// Whether the connection and the stream are both still up.
    pub fn check(&self) -> Result<(), Lost> {
        // SAFETY: valid context and stream.
        let (context, stream) = unsafe {
            (
                (self.lib.context_get_state)(self.context),
                (self.lib.stream_get_state)(self.stream),
            )
        };
        if context != PA_CONTEXT_READY {
            Err(Lost::Server)
        } else if stream != PA_STREAM_READY {
            Err(Lost::Stream)
        } else {
            Ok(())
        }
    }

    /// After a call failed: what went away.
    fn lost(&self) -> Lost {
        self.check().err().unwrap_or(Lost::Server)
    }

    /// Frames received and not read yet, without looking at the connection.
    pub fn queued_frames(&self) -> Result<usize, Lost> {
        // SAFETY: a valid stream; on one that is no longer ready this answers (size_t)-1.
        let n = unsafe { (self.lib.stream_readable_size)(self.stream) };
        if n == usize::MAX {
            return Err(self.lost());
        }
        Ok(n.saturating_sub(self.offset) / 2)
    }

    /// Runs what is pending on the connection without waiting, then says how many frames
    /// can be read.
    pub fn readable_frames(&mut self) -> Result<usize, Lost> {
        for _ in 0..16 {
            // SAFETY: a valid main loop, this thread only.
            let n = unsafe { (self.lib.mainloop_iterate)(self.mainloop, 0, std::ptr::null_mut()) };
            if n < 0 {
                return Err(self.lost());
            }
            if n == 0 {
                break;
            }
        }
        self.check()?;
        self.queued_frames()
    }

    /// Copies up to `buf.len()` frames out of the fragments received; a hole (audio the
    /// server lost) leaves `buf`'s zeros. Returns the frames taken.
    pub fn read(&mut self, buf: &mut [i16]) -> Result<usize, Lost> {
        let mut frames = 0;
        while frames < buf.len() {
            let mut data: *const c_void = std::ptr::null();
            let mut nbytes = 0usize;
            // SAFETY: a ready stream; data/nbytes are written by libpulse and stay valid
            // until pa_stream_drop.
            if unsafe { (self.lib.stream_peek)(self.stream, &mut data, &mut nbytes) } < 0 {
                return Err(self.lost());
            }
            if nbytes == 0 {
                break;
            }
            let take = (nbytes.saturating_sub(self.offset) / 2).min(buf.len() - frames);
            if !data.is_null() && take > 0 {
                // SAFETY: `data` holds `nbytes` bytes and offset + 2 * take <= nbytes.
                // Samples may be unaligned, so they are read as bytes.
                let src = unsafe {
                    std::slice::from_raw_parts(data.cast::<u8>().add(self.offset), take * 2)
                };
                for (dst, pair) in buf[frames..frames + take]
                    .iter_mut()
                    .zip(src.chunks_exact(2))
                {
                    *dst = i16::from_le_bytes([pair[0], pair[1]]);
                }
            }
            frames += take;
            self.offset += take * 2;
            if nbytes.saturating_sub(self.offset) < 2 {
                // SAFETY: a fragment was peeked above and is released once.
                unsafe { (self.lib.stream_drop)(self.stream) };
                self.offset = 0;
            }
        }
        Ok(frames)
    }

    /// Waits for the next packet from the server, at most `timeout_ms`.
    pub fn wait(&mut self, timeout_ms: u32) -> Result<(), Lost> {
        let us = c_int::try_from(u64::from(timeout_ms) * 1000).unwrap_or(c_int::MAX);
        if !self.iterate_for(us) {
            return Err(self.lost());
        }
        self.check()
    }

    /// Asks the server for fragments of `bytes` from now on, without waiting for the
    /// answer (a live stream changes size without a gap).
    pub fn set_fragment(&mut self, bytes: u32) {
        let attr = attr(bytes, self.max_bytes);
        // SAFETY: a ready stream; attr is copied; the operation is released at once (its
        // completion is not waited for: the next packets simply come at the new size).
        unsafe {
            let op = (self.lib.stream_set_buffer_attr)(
                self.stream,
                &attr,
                std::ptr::null(),
                std::ptr::null_mut(),
            );
            if !op.is_null() {
                (self.lib.operation_unref)(op);
            }
        }
    }
}

/// A record stream's buffer: the fragment size and the most kept unread; the rest (the
/// playback fields) left to the server.
fn attr(fragsize: u32, maxlength: u32) -> BufferAttr {
    BufferAttr {
        maxlength,
        tlength: u32::MAX,
        prebuf: u32::MAX,
        minreq: u32::MAX,
        fragsize,
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or owned by this value, released once, in the
        // reverse order of creation.
        unsafe {
            if !self.stream.is_null() {
                (self.lib.stream_disconnect)(self.stream);
                (self.lib.stream_unref)(self.stream);
            }
            if !self.context.is_null() {
                (self.lib.context_disconnect)(self.context);
                (self.lib.context_unref)(self.context);
            }
            (self.lib.mainloop_free)(self.mainloop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_name_libpulse_cannot_take_is_a_clear_error() {
        let error = match Record::open(Some("mic\0monitor"), 480, 96_000, &|| false) {
            Ok(_) => panic!("opened a source whose name has a NUL"),
            Err(e) => e,
        };
        assert_eq!(error, "invalid PulseAudio source name \"mic\\0monitor\"");
    }

    #[test]
    fn fragment_sizes_are_in_bytes_of_24_khz_mono_s16() {
        assert_eq!(bytes_for(Duration::from_millis(10)), 480);
        assert_eq!(bytes_for(Duration::from_millis(80)), 3840);
    }
}
