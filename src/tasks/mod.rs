//! The task engine: agent processes started from the `agent.command` template, supervised
//! on the poll loop, parsed, summarised, and kept in a registry.

pub mod names;
pub mod redact;
pub mod stream;
