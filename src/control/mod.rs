//! The control socket (`$XDG_RUNTIME_DIR/walkie/control.sock`) and the `walkie ctl` client.

pub mod client;
pub mod handler;
pub mod proto;
pub mod server;

pub use proto::Request;
pub use server::{ControlServer, StartupError};
