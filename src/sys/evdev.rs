//! evdev ioctls for the button (EVIOCGKEY, EVIOCGRAB, EVIOCGBIT, EVIOCGNAME).
//!
//! The button reader (`crate::button`) owns the fd; these are the only calls on it that the
//! safe crates do not cover. Each works on any fd and reports `ENOTTY`/`EINVAL` when the fd is
//! not an evdev node (a FIFO or a socket), which callers use to tell the two apart.
//! Request numbers follow `linux/input.h`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::ioctl::ioctl_num_type;

/// `KEY_MAX` from `linux/input-event-codes.h`: the highest key code.
pub const KEY_MAX: u16 = 0x2ff;
/// Bytes in a key bitmap (`KEY_MAX / 8 + 1`), the size EVIOCGKEY and EVIOCGBIT(EV_KEY) fill.
const KEY_BITMAP_LEN: usize = KEY_MAX as usize / 8 + 1;
/// `EV_KEY` from `linux/input-event-codes.h`.
const EV_KEY: u8 = 0x01;
/// Longest device name kept; the kernel truncates to the buffer and NUL-terminates.
const NAME_LEN: usize = 256;

/// `EVIOCGNAME(len)`: `_IOC(_IOC_READ, 'E', 0x06, len)`.
const fn eviocgname(len: usize) -> ioctl_num_type {
    nix::request_code_read!(b'E', 0x06, len)
}

/// `EVIOCGKEY(len)`: `_IOC(_IOC_READ, 'E', 0x18, len)`, the global key state bitmap.
const fn eviocgkey(len: usize) -> ioctl_num_type {
    nix::request_code_read!(b'E', 0x18, len)
}

/// `EVIOCGBIT(ev, len)`: `_IOC(_IOC_READ, 'E', 0x20 + ev, len)`, the codes a device can send.
const fn eviocgbit(ev: u8, len: usize) -> ioctl_num_type {
    nix::request_code_read!(b'E', 0x20 + ev, len)
}

/// `EVIOCGRAB`: `_IOW('E', 0x90, int)`; the argument is passed by value, not by pointer.
const EVIOCGRAB: ioctl_num_type = nix::request_code_write!(b'E', 0x90, size_of::<libc::c_int>());

/// Reads a bitmap-returning ioctl into a `KEY_BITMAP_LEN` buffer.
fn read_key_bitmap(
    fd: BorrowedFd<'_>,
    request: ioctl_num_type,
) -> io::Result<[u8; KEY_BITMAP_LEN]> {
    let mut bits = [0u8; KEY_BITMAP_LEN];
    // SAFETY: `request` encodes `bits.len()` as its size, so the kernel writes at most that
    // many bytes into the buffer, which lives for the whole call; the fd is borrowed, open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, bits.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bits)
}

fn bit_is_set(bits: &[u8], code: u16) -> bool {
    bits.get(usize::from(code) / 8)
        .is_some_and(|byte| byte & (1 << (code % 8)) != 0)
}

/// Whether key `code` is down right now (EVIOCGKEY). Used to resynchronise after
/// `SYN_DROPPED` and to learn the key's state when the device is opened.
pub fn key_is_down(fd: BorrowedFd<'_>, code: u16) -> io::Result<bool> {
    let bits = read_key_bitmap(fd, eviocgkey(KEY_BITMAP_LEN))?;
    Ok(bit_is_set(&bits, code))
}

/// Whether the device can send key `code` at all (EVIOCGBIT(EV_KEY)). An `Err` means the fd
/// is not an evdev node.
pub fn has_key(fd: BorrowedFd<'_>, code: u16) -> io::Result<bool> {
    Ok(supported_keys(fd)?.contains(code))
}

/// The key codes a device can send, as EVIOCGBIT(EV_KEY) reports them.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySet([u8; KEY_BITMAP_LEN]);

impl KeySet {
    /// A set holding exactly `codes` (codes past [`KEY_MAX`] are left out).
    pub fn from_codes(codes: impl IntoIterator<Item = u16>) -> KeySet {
        let mut bits = [0u8; KEY_BITMAP_LEN];
        for code in codes.into_iter().filter(|&c| c <= KEY_MAX) {
            bits[usize::from(code) / 8] |= 1 << (code % 8);
        }
        KeySet(bits)
    }

    pub fn contains(&self, code: u16) -> bool {
        bit_is_set(&self.0, code)
    }

    /// How many codes the device can send.
    pub fn len(&self) -> usize {
        self.0.iter().map(|b| b.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeySet({} keys)", self.len())
    }
}

/// The key codes the device can send (EVIOCGBIT(EV_KEY)). An `Err` means the fd is not an
/// evdev node.
pub fn supported_keys(fd: BorrowedFd<'_>) -> io::Result<KeySet> {
    read_key_bitmap(fd, eviocgbit(EV_KEY, KEY_BITMAP_LEN)).map(KeySet)
}

/// Takes (`true`) or gives back (`false`) exclusive use of the device (EVIOCGRAB), so its
/// key presses stop reaching the console and X/Wayland. `EBUSY`: someone else holds it.
pub fn grab(fd: BorrowedFd<'_>, exclusive: bool) -> io::Result<()> {
    let arg = libc::c_int::from(exclusive);
    // SAFETY: EVIOCGRAB reads its int argument by value; no memory is passed.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), EVIOCGRAB, arg) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The device's human-readable name (EVIOCGNAME), e.g. `"PCsensor FootSwitch"`.
pub fn device_name(fd: BorrowedFd<'_>) -> io::Result<String> {
    let mut buf = [0u8; NAME_LEN];
    // SAFETY: the request encodes `buf.len()`, so the kernel writes at most that many bytes
    // into the buffer, which outlives the call; the fd is borrowed, open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), eviocgname(NAME_LEN), buf.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // The return value is the length copied including the NUL; trust the NUL instead.
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// A new close-on-exec descriptor for the open file behind descriptor number `fd`.
///
/// For `button.device = "/proc/self/fd/N"` naming a socket, which `open(2)` refuses with
/// `ENXIO`. The new fd shares the open file description (its flags, e.g. `O_NONBLOCK`).
pub fn dup_fd_number(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) takes an int and passes no memory; a number that is not
    // an open fd fails with EBADF and nothing else happens.
    let new_fd = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new_fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_DUPFD_CLOEXEC returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new_fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    // The generic ioctl encoding (x86, arm, aarch64, riscv); mips/powerpc/sparc differ.
    #[cfg(any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64"
    ))]
    #[test]
    // ioctl_num_type is u64 here but u32/i32 elsewhere, so the casts are needed in general.
    #[allow(clippy::unnecessary_cast)]
    fn request_numbers_match_linux_input_h() {
        assert_eq!(eviocgkey(KEY_BITMAP_LEN) as u64, 0x8060_4518);
        assert_eq!(eviocgbit(EV_KEY, KEY_BITMAP_LEN) as u64, 0x8060_4521);
        assert_eq!(eviocgname(NAME_LEN) as u64, 0x8100_4506);
        assert_eq!(EVIOCGRAB as u64, 0x4004_4590);
    }

    #[test]
    fn bitmap_bits_are_little_endian_per_byte() {
        let mut bits = [0u8; KEY_BITMAP_LEN];
        bits[183 / 8] = 1 << (183 % 8); // KEY_F13
        assert!(bit_is_set(&bits, 183));
        assert!(!bit_is_set(&bits, 182));
        assert!(!bit_is_set(&bits, 184));
        assert!(!bit_is_set(&bits, KEY_MAX + 8)); // past the bitmap: not set, no panic
    }

    #[test]
    fn key_sets_count_and_answer_membership() {
        let set = KeySet::from_codes([1, 183, KEY_MAX, KEY_MAX + 1]);
        assert_eq!(set.len(), 3, "a code past KEY_MAX is left out");
        assert!(set.contains(183) && set.contains(KEY_MAX) && set.contains(1));
        assert!(!set.contains(0) && !set.contains(184));
        assert!(KeySet::from_codes([]).is_empty());
        assert!(!set.is_empty());
    }

    #[test]
    fn ioctls_on_a_pipe_fail_instead_of_pretending() {
        let (read_end, _write_end) = nix::unistd::pipe().unwrap();
        let fd = read_end.as_fd();
        assert!(key_is_down(fd, 183).is_err());
        assert!(has_key(fd, 183).is_err());
        assert!(supported_keys(fd).is_err());
        assert!(grab(fd, true).is_err());
        assert!(device_name(fd).is_err());
    }

    #[test]
    fn dup_fd_number_shares_the_open_file() {
        use std::io::{Read, Write};
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let dup = dup_fd_number(read_end.as_raw_fd()).unwrap();
        assert_ne!(dup.as_raw_fd(), read_end.as_raw_fd());
        std::fs::File::from(write_end).write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        std::fs::File::from(dup).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        assert!(dup_fd_number(-1).is_err());
    }
}
