//! The model's tools (start_task, …): JSON arguments in, short JSON outputs out. (in progress)
