//! Under a real kernel: the button and the sound card through Linux's own evdev and ALSA
//! drivers, in a Debian kernel booted under qemu (tools/vm/README.md).
//!
//! Every test runs inside the guest: uinput devices stand in for the USB button, snd-aloop
//! for the sound card, and walkie, fake-realtime and the fake agent run there too. The
//! host boots the guest once for all of them and reports each test's result as its own.

#[path = "../common/mod.rs"]
mod common;

/// A kernel test: its body runs in the guest; on the host it reports the guest's result.
macro_rules! kernel_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            $crate::vm::run(module_path!(), stringify!($name), || $body)
        }
    };
}

mod audio;
mod button;
mod guest;
mod sound;
mod uinput;
mod vm;
mod wire;
