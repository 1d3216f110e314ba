//! `struct input_event` records: the wire format of evdev nodes, and of the FIFOs and
//! sockets tests and scripts use in their place.
//!
//! A record is `struct timeval time; __u16 type; __u16 code; __s32 value;` in native byte
//! order: 24 bytes on 64-bit targets (x86-64, aarch64), 16 on 32-bit ones. The kernel only
//! ever returns whole records from an evdev node, but a FIFO or a socket may split one
//! across reads, so the decoder keeps the tail of a read for the next one. The timestamp is
//! ignored: walkie times everything with its own monotonic clock.

/// Bytes in one record on this target.
pub const RECORD_SIZE: usize = size_of::<libc::input_event>();
/// Offset of `type`; `code` and `value` follow it.
const TYPE_OFFSET: usize = RECORD_SIZE - 8;

/// The fields of one `input_event` that walkie uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputRecord {
    /// `EV_SYN`, `EV_KEY`, … (`type` in C).
    pub kind: u16,
    pub code: u16,
    pub value: i32,
}

impl InputRecord {
    pub fn new(kind: u16, code: u16, value: i32) -> InputRecord {
        InputRecord { kind, code, value }
    }

    /// The record as the kernel would write it, with a zero timestamp.
    pub fn to_bytes(self) -> [u8; RECORD_SIZE] {
        let mut bytes = [0u8; RECORD_SIZE];
        bytes[TYPE_OFFSET..TYPE_OFFSET + 2].copy_from_slice(&self.kind.to_ne_bytes());
        bytes[TYPE_OFFSET + 2..TYPE_OFFSET + 4].copy_from_slice(&self.code.to_ne_bytes());
        bytes[TYPE_OFFSET + 4..].copy_from_slice(&self.value.to_ne_bytes());
        bytes
    }

    fn from_bytes(bytes: &[u8; RECORD_SIZE]) -> InputRecord {
        let t = TYPE_OFFSET;
        InputRecord {
            kind: u16::from_ne_bytes([bytes[t], bytes[t + 1]]),
            code: u16::from_ne_bytes([bytes[t + 2], bytes[t + 3]]),
            value: i32::from_ne_bytes([bytes[t + 4], bytes[t + 5], bytes[t + 6], bytes[t + 7]]),
        }
    }
}

/// Splits a byte stream into records, carrying a partial record across calls. One decoder
/// per open fd: a partial record left when a stream ends is dropped with it.
#[derive(Debug)]
pub struct RecordDecoder {
    partial: [u8; RECORD_SIZE],
    partial_len: usize,
}

impl Default for RecordDecoder {
    fn default() -> Self {
        RecordDecoder {
            partial: [0; RECORD_SIZE],
            partial_len: 0,
        }
    }
}

impl RecordDecoder {
    /// Decodes every record completed by `bytes`, in order, passing each to `on_record`.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_record: impl FnMut(InputRecord)) {
        if self.partial_len > 0 {
            let take = (RECORD_SIZE - self.partial_len).min(bytes.len());
            self.partial[self.partial_len..self.partial_len + take].copy_from_slice(&bytes[..take]);
            self.partial_len += take;
            bytes = &bytes[take..];
            if self.partial_len < RECORD_SIZE {
                return;
            }
            self.partial_len = 0;
            on_record(InputRecord::from_bytes(&self.partial));
        }
        let mut chunks = bytes.chunks_exact(RECORD_SIZE);
        for chunk in &mut chunks {
            if let Ok(record) = <&[u8; RECORD_SIZE]>::try_from(chunk) {
                on_record(InputRecord::from_bytes(record));
            }
        }
        let rest = chunks.remainder();
        self.partial[..rest.len()].copy_from_slice(rest);
        self.partial_len = rest.len();
    }

    /// Bytes of an unfinished record held back.
    pub fn pending(&self) -> usize {
        self.partial_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut RecordDecoder, bytes: &[u8]) -> Vec<InputRecord> {
        let mut out = Vec::new();
        decoder.feed(bytes, |r| out.push(r));
        out
    }

    fn sample() -> Vec<InputRecord> {
        vec![
            InputRecord::new(4, 4, 0x70068), // EV_MSC/MSC_SCAN
            InputRecord::new(1, 183, 1),
            InputRecord::new(0, 0, 0),
            InputRecord::new(1, 183, -7),
        ]
    }

    #[test]
    fn record_size_is_the_kernel_struct() {
        #[cfg(target_pointer_width = "64")]
        assert_eq!(RECORD_SIZE, 24);
        #[cfg(target_pointer_width = "32")]
        assert_eq!(RECORD_SIZE, 16);
    }

    #[test]
    fn layout_matches_libc_input_event() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(libc::input_event, type_), TYPE_OFFSET);
        assert_eq!(offset_of!(libc::input_event, code), TYPE_OFFSET + 2);
        assert_eq!(offset_of!(libc::input_event, value), TYPE_OFFSET + 4);
        let bytes = InputRecord::new(1, 183, 2).to_bytes();
        assert_eq!(
            &bytes[..TYPE_OFFSET],
            &[0u8; TYPE_OFFSET],
            "timestamp left zero"
        );
        assert_eq!(bytes[TYPE_OFFSET..TYPE_OFFSET + 2], 1u16.to_ne_bytes());
        assert_eq!(
            bytes[TYPE_OFFSET + 2..TYPE_OFFSET + 4],
            183u16.to_ne_bytes()
        );
        assert_eq!(bytes[TYPE_OFFSET + 4..], 2i32.to_ne_bytes());
    }

    #[test]
    fn whole_records_round_trip() {
        let bytes: Vec<u8> = sample().iter().flat_map(|r| r.to_bytes()).collect();
        let mut decoder = RecordDecoder::default();
        assert_eq!(decode_all(&mut decoder, &bytes), sample());
        assert_eq!(decoder.pending(), 0);
    }

    #[test]
    fn records_split_at_every_byte_boundary_decode_the_same() {
        let bytes: Vec<u8> = sample().iter().flat_map(|r| r.to_bytes()).collect();
        for split in 1..bytes.len() {
            let mut decoder = RecordDecoder::default();
            let mut out = decode_all(&mut decoder, &bytes[..split]);
            out.extend(decode_all(&mut decoder, &bytes[split..]));
            assert_eq!(out, sample(), "split at {split}");
        }
        // One byte at a time.
        let mut decoder = RecordDecoder::default();
        let mut out = Vec::new();
        for b in &bytes {
            decoder.feed(std::slice::from_ref(b), |r| out.push(r));
        }
        assert_eq!(out, sample());
    }
}
