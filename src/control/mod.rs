//! The control socket (`$XDG_RUNTIME_DIR/walkie/control.sock`) and the `walkie ctl` client.
