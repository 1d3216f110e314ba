//! The OpenAI Realtime (GA) link: event types, the connection state machine, TLS and
//! WebSocket IO over mio, and the trace.

pub mod events;
pub mod link;
pub mod probe;
pub mod tls;
pub mod trace;
