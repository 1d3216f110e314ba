//! The daemon: builds the parts and runs the loop. (in progress)
