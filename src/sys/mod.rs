//! The only place with `unsafe`: raw syscalls and ioctls the safe crates do not cover.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment. Submodules group them by owner:
//! [`process`] for the task supervisor (pidfd, pre-exec setup), [`evdev`] for the button,
//! [`sched`] for the real-time audio threads, [`pulse`] for the PulseAudio microphone.

pub mod evdev;
pub mod process;
pub mod pulse;
pub mod sched;
