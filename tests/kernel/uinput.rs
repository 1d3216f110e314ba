//! Virtual input devices through `/dev/uinput`, as a USB foot switch or keyboard would
//! appear, and a second evdev reader (another program holding the same device).
//!
//! The test crate's only `unsafe`: the uinput and evdev ioctls, which no safe crate in the
//! tree covers. Request numbers follow `linux/uinput.h` and `linux/input.h`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const EV_SYN: u16 = 0x00;
pub const EV_KEY: u16 = 0x01;
pub const EV_REP: u16 = 0x14;
pub const SYN_REPORT: u16 = 0;
pub const KEY_F13: u16 = 183;
pub const KEY_F15: u16 = 185;
pub const KEY_1: u16 = 2;
/// The letter keys A–Z: with them a device is a full keyboard.
pub const LETTERS: [u16; 26] = [
    16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 30, 31, 32, 33, 34, 35, 36, 37, 38, 44, 45, 46, 47, 48,
    49, 50,
];

nix::ioctl_none!(ui_dev_create, b'U', 1);
nix::ioctl_none!(ui_dev_destroy, b'U', 2);
nix::ioctl_write_ptr!(ui_dev_setup, b'U', 3, libc::uinput_setup);
nix::ioctl_write_int!(ui_set_evbit, b'U', 100);
nix::ioctl_write_int!(ui_set_keybit, b'U', 101);
nix::ioctl_read_buf!(ui_get_sysname, b'U', 44, u8);
nix::ioctl_write_int!(eviocgrab, b'E', 0x90);

/// One `struct input_event` with a zero timestamp (the kernel stamps what uinput sends).
fn record(kind: u16, code: u16, value: i32) -> [u8; 24] {
    let mut rec = [0u8; 24];
    rec[16..18].copy_from_slice(&kind.to_ne_bytes());
    rec[18..20].copy_from_slice(&code.to_ne_bytes());
    rec[20..24].copy_from_slice(&value.to_ne_bytes());
    rec
}

/// A virtual input device; destroyed (unplugged) when dropped.
pub struct VirtualDevice {
    file: Option<File>,
    /// `/dev/input/eventN`.
    pub node: PathBuf,
}

impl VirtualDevice {
    /// A one-key switch sending KEY_F13, like a USB foot pedal.
    pub fn switch(name: &str) -> VirtualDevice {
        VirtualDevice::create(name, &[KEY_F13], false)
    }

    /// A device that can send `keys` (`repeat`: the kernel autorepeats held keys). Waits
    /// for its node to appear.
    pub fn create(name: &str, keys: &[u16], repeat: bool) -> VirtualDevice {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/uinput")
            .expect("/dev/uinput (is the uinput module loaded?)");
        let fd = file.as_raw_fd();
        // SAFETY (all blocks below): the fd is an open /dev/uinput; the int requests pass
        // their argument by value, the setup request reads a struct that lives on this
        // stack for the call, and the sysname request writes at most `buf.len()` bytes.
        unsafe {
            ui_set_evbit(fd, EV_KEY.into()).expect("UI_SET_EVBIT EV_KEY");
            if repeat {
                ui_set_evbit(fd, EV_REP.into()).expect("UI_SET_EVBIT EV_REP");
            }
            for &k in keys {
                ui_set_keybit(fd, k.into()).expect("UI_SET_KEYBIT");
            }
        }
        let mut setup: libc::uinput_setup = unsafe { std::mem::zeroed() };
        setup.id.bustype = 0x03; // BUS_USB
        setup.id.vendor = 0x1209;
        setup.id.product = 0x7a1c;
        for (dst, src) in setup.name.iter_mut().zip(name.bytes().take(79)) {
            *dst = src as libc::c_char;
        }
        let mut buf = [0u8; 64];
        unsafe {
            ui_dev_setup(fd, &setup).expect("UI_DEV_SETUP");
            ui_dev_create(fd).expect("UI_DEV_CREATE");
            ui_get_sysname(fd, &mut buf).expect("UI_GET_SYSNAME");
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let sysname = String::from_utf8_lossy(&buf[..end]).into_owned();
        let sys = Path::new("/sys/devices/virtual/input").join(&sysname);
        let mut node = None;
        assert!(
            crate::common::wait_until(Duration::from_secs(10), || {
                node = std::fs::read_dir(&sys).ok().and_then(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .find(|n| n.starts_with("event"))
                        .map(|n| Path::new("/dev/input").join(n))
                        .filter(|p| p.exists())
                });
                node.is_some()
            }),
            "no /dev/input node appeared for {sysname}"
        );
        VirtualDevice {
            file: Some(file),
            node: node.unwrap(),
        }
    }

    /// Sends records as one batch ending with a SYN_REPORT.
    pub fn send(&self, events: &[(u16, u16, i32)]) {
        let mut bytes = Vec::new();
        for &(kind, code, value) in events {
            bytes.extend_from_slice(&record(kind, code, value));
        }
        bytes.extend_from_slice(&record(EV_SYN, SYN_REPORT, 0));
        self.file
            .as_ref()
            .expect("destroyed")
            .write_all(&bytes)
            .expect("uinput write");
    }

    pub fn key(&self, code: u16, value: i32) {
        self.send(&[(EV_KEY, code, value)]);
    }

    pub fn press(&self) {
        self.key(KEY_F13, 1);
    }

    pub fn release(&self) {
        self.key(KEY_F13, 0);
    }

    /// Press, hold for `ms`, release.
    pub fn tap(&self, ms: u64) {
        self.press();
        std::thread::sleep(Duration::from_millis(ms));
        self.release();
    }

    /// Unplugs the device; returns once its node is gone.
    pub fn destroy(&mut self) {
        if let Some(file) = self.file.take() {
            // SAFETY: a request without argument on an open /dev/uinput.
            unsafe { ui_dev_destroy(file.as_raw_fd()) }.expect("UI_DEV_DESTROY");
            drop(file);
            assert!(
                crate::common::wait_until(Duration::from_secs(10), || !self.node.exists()),
                "{} still there after UI_DEV_DESTROY",
                self.node.display()
            );
        }
    }
}

impl Drop for VirtualDevice {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            // SAFETY: as in `destroy`.
            let _ = unsafe { ui_dev_destroy(file.as_raw_fd()) };
        }
    }
}

/// Another program reading an evdev node.
pub struct Reader {
    file: File,
}

impl Reader {
    pub fn open(node: &Path) -> Reader {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(node)
            .unwrap_or_else(|e| panic!("{}: {e}", node.display()));
        Reader { file }
    }

    /// EVIOCGRAB: `Err(EBUSY)` while another reader holds the device.
    pub fn grab(&self, on: bool) -> nix::Result<()> {
        // SAFETY: EVIOCGRAB takes its int by value; the fd is an open evdev node.
        unsafe { eviocgrab(self.file.as_fd().as_raw_fd(), u64::from(on)) }.map(|_| ())
    }

    /// Every (type, code, value) that arrives within `wait`.
    pub fn records(&mut self, wait: Duration) -> Vec<(u16, u16, i32)> {
        let mut out = Vec::new();
        let end = Instant::now() + wait;
        let mut buf = [0u8; 24 * 64];
        while Instant::now() < end {
            match self.file.read(&mut buf) {
                Ok(n) => {
                    for rec in buf[..n].chunks_exact(24) {
                        out.push((
                            u16::from_ne_bytes([rec[16], rec[17]]),
                            u16::from_ne_bytes([rec[18], rec[19]]),
                            i32::from_ne_bytes([rec[20], rec[21], rec[22], rec[23]]),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("evdev read: {e}"),
            }
        }
        out
    }
}
