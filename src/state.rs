//! The state file. (in progress)
