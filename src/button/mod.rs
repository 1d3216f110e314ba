//! The push-to-talk button: evdev record reader and key state machine. (in progress)
