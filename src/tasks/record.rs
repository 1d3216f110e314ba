//! The registry's records: what walkie knows about each task, as stored in the state file
//! and shown by `walkie ctl tasks --json` (README.md).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Running,
    /// Running, and its agent waits for the user's approval of a tool use.
    Waiting,
    Succeeded,
    Failed,
    Cancelled,
    /// walkie stopped (shutdown, crash) while the task ran.
    Interrupted,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Waiting => "waiting",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Interrupted => "interrupted",
        }
    }

    /// Its agent is at work (or waits for an approval): it counts toward
    /// `agent.max_running`, and its outcome is still to come.
    pub fn is_running(self) -> bool {
        matches!(self, TaskState::Running | TaskState::Waiting)
    }
}

/// One task. Field names are the stable JSON interface; new fields get serde defaults so
/// older state files still load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub name: String,
    /// Unique id: the `WALKIE_TASK` marker in the task's processes' environment.
    pub id: String,
    pub state: TaskState,
    pub project: Option<String>,
    /// The agent's working directory.
    pub cwd: String,
    /// The latest prompt (a `continue` replaces it).
    pub prompt: String,
    /// The agent's pid while running; null otherwise.
    pub pid: Option<i32>,
    /// `/proc/<pid>/stat` start time of `pid`, so a reused pid is never mistaken for it.
    #[serde(default)]
    pub pid_start_time: Option<u64>,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub exit_code: Option<i32>,
    /// Short, redacted, speakable summary of the outcome.
    pub summary: Option<String>,
    pub session_id: Option<String>,
    #[serde(default)]
    pub files_changed: Vec<String>,
    /// The agent's final text, redacted and bounded.
    #[serde(default)]
    pub result_text: Option<String>,
    /// Why it failed or was interrupted.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
    /// Runs so far: 1 + the number of `continue`s.
    #[serde(default = "one")]
    pub runs: u32,
    /// Its turn is over and its agent process waits for a follow-up (`agent.warm_s`);
    /// `pid` is the process.
    #[serde(default)]
    pub warm: bool,
}

fn one() -> u32 {
    1
}
