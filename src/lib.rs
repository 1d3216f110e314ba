//! walkie: a push-to-talk voice front end for coding agents.
//!
//! One thread runs a `mio::Poll` loop ([`daemon`]) over every fd; real-time ALSA threads
//! ([`audio`]) move PCM through lock-free rings. Protocol and policy live in sans-IO cores
//! ([`conversation`], [`realtime::events`], [`tasks::stream`], [`button::keys`]) fed with
//! inputs and asked for outputs; the IO shells around them are thin. See docs/ARCHITECTURE.md.

// All `unsafe` lives in `sys` (ioctls, prctl, pidfd, scheduling), each block with a SAFETY note.
#![deny(unsafe_code)]

pub mod audio;
pub mod button;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod conversation;
pub mod daemon;
pub mod devices;
pub mod doctor;
pub mod files;
pub mod help;
pub mod instance;
pub mod logging;
pub mod paths;
#[cfg(feature = "probe")]
pub mod probe;
pub mod reactor;
pub mod realtime;
pub mod sd_notify;
pub mod signals;
pub mod state;
#[allow(unsafe_code)]
pub mod sys;
pub mod tasks;
pub mod tools;
pub mod voice;
