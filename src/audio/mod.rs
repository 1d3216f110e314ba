//! Audio: capture and playback threads, rings, earcons, backends. (in progress)
