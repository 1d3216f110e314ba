//! The task engine: agent processes started from the `agent.command` template, supervised
//! on the poll loop, parsed, summarised, and kept in a registry.

pub mod claude;
pub mod contain;
pub mod engine;
pub mod lifecycle;
pub mod members;
pub mod names;
pub mod output;
pub mod proc;
pub mod record;
pub mod redact;
pub mod stream;
pub mod writer;

pub use engine::{EngineSettings, TaskEngine, TaskError, TaskEvent};
pub use record::{TaskRecord, TaskState};
