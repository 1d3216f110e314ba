//! Builders for the Claude Code CLI's stream-json lines (no IO, no clock of their own).
//!
//! Shapes copied from the real captures in `tests/fixtures/claude-cli/` (CLI 2.1.331): every
//! line carries `type`, `session_id` and `uuid`; assistant and user lines also carry a
//! `timestamp`. The init line reproduces the real one's lists so it is several KB long, as
//! walkie's parser will meet it. Callers pass the timestamp in, so tests are deterministic.

use serde_json::{Map, Value, json};

/// The version the fixtures were captured with; walkie may log it, nothing more.
pub const CLAUDE_CODE_VERSION: &str = "2.1.331";
/// Model named when `--model` is not given (the one in the fixtures).
pub const DEFAULT_MODEL: &str = "claude-opus-5-5";

const TOOLS: &[&str] = &[
    "Task",
    "Bash",
    "CronCreate",
    "CronDelete",
    "CronList",
    "Edit",
    "EnterWorktree",
    "ExitWorktree",
    "ListAgents",
    "Monitor",
    "NotebookEdit",
    "Read",
    "ReportFindings",
    "ScheduleWakeup",
    "SendMessage",
    "Skill",
    "TaskStop",
    "ToolSearch",
    "WebFetch",
    "WebSearch",
    "Workflow",
    "Write",
];

const SKILLS: &[&str] = &[
    "deep-research",
    "dataviz",
    "update-config",
    "verify",
    "debug",
    "code-review",
    "simplify",
    "batch",
    "fewer-permission-prompts",
    "doctor",
    "loop",
    "claude-api",
    "workflow-authoring",
    "run",
    "run-skill-generator",
    "plugin-authoring",
];

const MORE_SLASH_COMMANDS: &[&str] = &[
    "agents",
    "auto-mode-setup",
    "autocompact",
    "clear",
    "color",
    "compact",
    "config",
    "output-style",
    "context",
    "effort",
    "fast",
    "focus",
    "heapdump",
    "init",
    "mcp",
    "model",
    "reload-plugins",
    "reload-skills",
    "rename",
    "security-review",
    "usage",
    "insights",
    "recap",
    "goal",
    "list-agents",
    "team-onboarding",
];

const CAPABILITIES: &[&str] = &[
    "interrupt_receipt_v1",
    "interrupt_cancel_queued_v1",
    "interrupt_send_now_v1",
    "msg_lifecycle_v1",
    "request_marker_lists_v1",
    "sdk_mcp_tools_list_changed",
    "mcp_read_resource_v1",
    "ui_surface_v1",
    "withdrawn_files_note_v2",
    "get_usage_detached_v1",
];

/// What every line of one run shares.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub model: String,
    /// Absolute working directory, as the CLI reports it.
    pub cwd: String,
    pub permission_mode: String,
}

/// A random UUID v4 in the canonical 8-4-4-4-12 lowercase form.
pub fn uuid_v4() -> String {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// An id like the fixtures' `msg_fake…`, `toolu_fake…`, `req_fake…` (prefix + 24 hex digits).
pub fn fake_id(prefix: &str) -> String {
    format!("{prefix}_fake{:024x}", fastrand::u128(..) >> 32)
}

/// RFC 3339 UTC with milliseconds, as in the CLI's `timestamp` fields.
pub fn timestamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The `system`/`init` line, always first.
pub fn init(session: &Session, api_key_source: &str, tmp_dir: &str, pid: u32) -> Value {
    let slash: Vec<&str> = SKILLS.iter().chain(MORE_SLASH_COMMANDS).copied().collect();
    let project_dir: String = session
        .cwd
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    json!({
        "type": "system",
        "subtype": "init",
        "cwd": session.cwd,
        "session_id": session.id,
        "tools": TOOLS,
        "mcp_servers": [],
        "model": session.model,
        "permissionMode": session.permission_mode,
        "slash_commands": slash,
        "terminal_slash_commands": ["doctor", "color", "focus", "reload-plugins"],
        "apiKeySource": api_key_source,
        "claude_code_version": CLAUDE_CODE_VERSION,
        "output_style": "default",
        "agents": ["claude", "Explore", "general-purpose", "Plan", "statusline-setup"],
        "skills": SKILLS,
        "plugins": [
            {"name": "cc-plugin-agents-md", "path": "builtin", "source": "cc-plugin-agents-md@builtin"},
            {"name": "cc-plugin-privacy", "path": "builtin", "source": "cc-plugin-privacy@builtin"}
        ],
        "capabilities": CAPABILITIES,
        "analytics_disabled": true,
        "product_feedback_disabled": true,
        "served_by_anthropic": false,
        "uuid": uuid_v4(),
        "sandbox_enabled": false,
        "memory_paths": {"auto": format!("~/.claude/projects/{project_dir}/memory/")},
        "original_cwd": session.cwd,
        "additional_directories": [],
        "messaging_socket_path": format!("{tmp_dir}/cc-socks/{pid}.sock"),
        "fast_mode_state": "off",
        "fast_mode_disabled_reason": "sdk_opt_in_required",
        "per_turn_effort_active": true,
        "ultrathink_available": false,
        "ultrathink_typed_raises": false,
        "view_mode": "default"
    })
}

/// Per-message token usage as the fixtures show it (the stand-in API's constant figures).
fn message_usage() -> Value {
    json!({
        "input_tokens": 100,
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0
    })
}

pub fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

pub fn tool_use_block(id: &str, name: &str, input: Value) -> Value {
    json!({"type": "tool_use", "id": id, "name": name, "input": input})
}

/// An `assistant` line carrying `content` blocks of message `message_id`.
pub fn assistant(session: &Session, message_id: &str, content: Vec<Value>, now_ms: u64) -> Value {
    json!({
        "type": "assistant",
        "message": {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": session.model,
            "content": content,
            "stop_reason": null,
            "stop_sequence": null,
            "usage": message_usage(),
            "context_management": null
        },
        "parent_tool_use_id": null,
        "session_id": session.id,
        "uuid": uuid_v4(),
        "timestamp": timestamp(now_ms),
        "request_id": fake_id("req")
    })
}

/// The synthetic assistant message the CLI prints when the API keeps failing (error401 fixture).
pub fn assistant_api_error(session: &Session, status: u16, text: &str, now_ms: u64) -> Value {
    let (error, error_type) = api_error_names(status);
    json!({
        "type": "assistant",
        "message": {
            "diagnostics": null,
            "id": uuid_v4(),
            "container": null,
            "model": "<synthetic>",
            "role": "assistant",
            "stop_details": null,
            "stop_reason": "stop_sequence",
            "stop_sequence": "",
            "type": "message",
            "content": [text_block(text)],
            "context_management": null
        },
        "parent_tool_use_id": null,
        "session_id": session.id,
        "uuid": uuid_v4(),
        "timestamp": timestamp(now_ms),
        "error": error,
        "request_id": fake_id("req"),
        "is_api_error_message": true,
        "api_error_status": status,
        "api_error_type": error_type
    })
}

/// The CLI's `error` and the API's `error.type` names for an HTTP status.
pub fn api_error_names(status: u16) -> (&'static str, &'static str) {
    match status {
        401 => ("authentication_failed", "authentication_error"),
        400 => ("invalid_request", "invalid_request_error"),
        403 => ("permission_denied", "permission_error"),
        404 => ("not_found", "not_found_error"),
        429 => ("rate_limit", "rate_limit_error"),
        529 => ("overloaded", "overloaded_error"),
        _ => ("server_error", "api_error"),
    }
}

/// A `user` line answering `tool_use_id`. `tool_use_result` is the CLI's structured copy
/// (an object for successes, an `"Error: …"` string for failures).
pub fn user_tool_result(
    session: &Session,
    tool_use_id: &str,
    content: &str,
    is_error: bool,
    tool_use_result: Value,
    now_ms: u64,
) -> Value {
    let decision = if is_error {
        json!({"id": tool_use_id, "non_execution_kind": "user-rejected"})
    } else {
        json!({"id": tool_use_id, "permission_decision":
            {"decision": "accept", "source": "config", "reason_type": "mode"}})
    };
    json!({
        "type": "user",
        "message": {
            "role": "user",
            "content": [{
                "tool_use_id": tool_use_id,
                "type": "tool_result",
                "content": content,
                "is_error": is_error
            }]
        },
        "parent_tool_use_id": null,
        "session_id": session.id,
        "uuid": uuid_v4(),
        "timestamp": timestamp(now_ms),
        "tool_use_result": tool_use_result,
        "tool_result_meta": [decision]
    })
}

/// A `user` line with a plain text block (the CLI's "[Request interrupted by user]" markers).
pub fn user_text(session: &Session, text: &str, now_ms: u64) -> Value {
    json!({
        "type": "user",
        "message": {"role": "user", "content": [text_block(text)]},
        "parent_tool_use_id": null,
        "session_id": session.id,
        "uuid": uuid_v4(),
        "timestamp": timestamp(now_ms)
    })
}

/// A `system` line of `subtype` with extra `fields` (api_retry, task_started, …).
pub fn system(session: &Session, subtype: &str, fields: Map<String, Value>) -> Value {
    let mut line = Map::new();
    line.insert("type".into(), json!("system"));
    line.insert("subtype".into(), json!(subtype));
    line.extend(fields);
    line.insert("uuid".into(), json!(uuid_v4()));
    line.insert("session_id".into(), json!(session.id));
    Value::Object(line)
}

/// A `stream_event` line (only with `--include-partial-messages`).
pub fn stream_event(session: &Session, message_id: &str, event: Value) -> Value {
    json!({
        "type": "stream_event",
        "event": event,
        "session_id": session.id,
        "parent_tool_use_id": null,
        "uuid": uuid_v4(),
        "api_message_id": message_id
    })
}

/// The tool result of a tool use the user rejected or interrupted (perm-deny-interrupt and
/// sigint-tool fixtures).
pub const REJECTED: &str = "The user doesn't want to proceed with this tool use. The tool use \
     was rejected (eg. if it was a file edit, the new_string was NOT written to the file). STOP \
     what you are doing and wait for the user to tell you how to proceed.";

/// What the CLI adds to [`REJECTED`] when the tool was stopped while running
/// (interrupt-tool fixture).
pub const STOPPED_WHILE_RUNNING: &str = " Correction to the text above: this call was stopped \
     while running, not refused before it ran. It may have run in part or in full, and its \
     changes may have been written. No permission prompt was involved. Work it started \
     elsewhere (a remote command, a background process) may still be running, so check before \
     starting the same work again. The instruction to stop and wait still stands.";

/// One of our user messages echoed back when the model takes it in
/// (`--replay-user-messages`, progress fixture).
pub fn replay(session: &Session, content: &Value, uuid: &str, now_ms: u64) -> Value {
    json!({
        "type": "user",
        "message": {"role": "user", "content": content},
        "session_id": session.id,
        "parent_tool_use_id": null,
        "uuid": uuid,
        "timestamp": timestamp(now_ms),
        "isReplay": true
    })
}

/// `command_lifecycle` of a user message carrying a uuid: `queued`, `started`, `completed`
/// (progress fixture).
pub fn command_lifecycle(session: &Session, command_uuid: &str, state: &str) -> Value {
    json!({
        "type": "command_lifecycle",
        "command_uuid": command_uuid,
        "state": state,
        "uuid": uuid_v4(),
        "session_id": session.id
    })
}

/// A `can_use_tool` control request (perm-allow and perm-write-allow fixtures). `extra`
/// holds `blocked_path` or `decision_reason` and `decision_reason_type`.
pub fn can_use_tool(
    request_id: &str,
    tool_use_id: &str,
    tool: &str,
    input: &Value,
    description: &str,
    suggestions: Vec<Value>,
    extra: Map<String, Value>,
) -> Value {
    let mut request = Map::new();
    request.insert("subtype".into(), json!("can_use_tool"));
    request.insert("tool_name".into(), json!(tool));
    request.insert("display_name".into(), json!(tool));
    request.insert("input".into(), input.clone());
    request.insert("description".into(), json!(description));
    request.insert("permission_suggestions".into(), Value::from(suggestions));
    request.extend(extra);
    request.insert("tool_use_id".into(), json!(tool_use_id));
    json!({"type": "control_request", "request_id": request_id, "request": request})
}

/// A control request of any other subtype, sent to the supervisor.
pub fn control_request(request_id: &str, subtype: &str) -> Value {
    json!({"type": "control_request", "request_id": request_id, "request": {"subtype": subtype}})
}

/// The CLI withdraws its request `request_id` (perm-unanswered fixture).
pub fn control_cancel_request(request_id: &str) -> Value {
    json!({"type": "control_cancel_request", "request_id": request_id})
}

/// The answer to the supervisor's control request (interrupt fixtures). Control lines carry
/// neither `session_id` nor `uuid`.
pub fn control_response(request_id: &str, response: Value) -> Value {
    json!({"type": "control_response",
           "response": {"subtype": "success", "request_id": request_id, "response": response}})
}

pub fn control_error(request_id: &str, error: &str) -> Value {
    json!({"type": "control_response",
           "response": {"subtype": "error", "request_id": request_id, "error": error}})
}

/// How a run ended, as the final `result` line reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// `subtype:"success"`, `is_error:false`.
    Success { text: String },
    /// The API kept failing: `subtype:"success"` but `is_error:true` (real CLI quirk).
    ApiError { status: u16, text: String },
    /// `--max-turns` reached: `error_max_turns`, no `result` text.
    MaxTurns { limit: u32 },
    /// SIGINT: `error_during_execution`; `in_tool` when a tool use was pending.
    Interrupted { in_tool: bool },
    /// A message sent with `"priority":"now"` ended the turn at a tool boundary: success
    /// with an empty `result` and `terminal_reason:"aborted_tools"` (steer-now fixture).
    Superseded,
}

/// Figures the result line reports besides its ending.
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    pub num_turns: u32,
    pub duration_ms: u64,
    /// Cost of earlier runs of the same session (`--resume` makes the cost cumulative).
    pub prior_cost_usd: f64,
}

/// The stand-in API's price of one turn (the fixtures' 0.00107 USD).
pub const COST_PER_TURN_USD: f64 = 0.00107;

/// The final `result` line; also the whole stdout of `--output-format json`.
pub fn result(session: &Session, ending: &Ending, tally: Tally) -> Value {
    let cost = match ending {
        Ending::ApiError { .. } => tally.prior_cost_usd,
        _ => tally.prior_cost_usd + COST_PER_TURN_USD * f64::from(tally.num_turns),
    };
    let (subtype, is_error, terminal_reason, stop_reason) = match ending {
        Ending::Success { .. } => ("success", false, "completed", json!("end_turn")),
        Ending::ApiError { .. } => ("success", true, "api_error", json!("stop_sequence")),
        Ending::MaxTurns { .. } => ("error_max_turns", true, "max_turns", json!("tool_use")),
        Ending::Interrupted { in_tool: true } => (
            "error_during_execution",
            true,
            "aborted_tools",
            json!("tool_use"),
        ),
        Ending::Interrupted { in_tool: false } => (
            "error_during_execution",
            true,
            "aborted_streaming",
            json!(null),
        ),
        Ending::Superseded => ("success", false, "aborted_tools", json!("tool_use")),
    };
    let mut line = json!({
        "type": "result",
        "subtype": subtype,
        "is_error": is_error,
        "duration_ms": tally.duration_ms,
        "duration_api_ms": tally.duration_ms / 2,
        "num_turns": tally.num_turns,
        "stop_reason": stop_reason,
        "session_id": session.id,
        "total_cost_usd": cost,
        "usage": {
            "input_tokens": 100 * tally.num_turns,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 30 * tally.num_turns,
            "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
            "service_tier": "standard"
        },
        "modelUsage": {
            session.model.as_str(): {
                "inputTokens": 100 * tally.num_turns,
                "outputTokens": 30 * tally.num_turns,
                "costUSD": cost,
                "contextWindow": 1_000_000,
                "maxOutputTokens": 128_000
            }
        },
        "permission_denials": [],
        "terminal_reason": terminal_reason,
        "fast_mode_state": "off",
        "safety_stops": 0,
        "uuid": uuid_v4(),
        "queued_turn_count": 0,
        "result_index": 0
    });
    if let Value::Object(fields) = &mut line {
        match ending {
            Ending::Success { text } => {
                fields.insert("result".into(), json!(text));
                fields.insert("api_error_status".into(), json!(null));
            }
            Ending::ApiError { status, text } => {
                fields.insert("result".into(), json!(text));
                fields.insert("api_error_status".into(), json!(status));
                fields.insert("api_error_type".into(), json!(api_error_names(*status).1));
            }
            Ending::MaxTurns { limit } => {
                fields.insert(
                    "errors".into(),
                    json!([format!("Reached maximum number of turns ({limit})")]),
                );
            }
            Ending::Interrupted { .. } => {
                fields.insert(
                    "errors".into(),
                    json!(["[ede_diagnostic] result_type=user last_content_type=n/a"]),
                );
            }
            Ending::Superseded => {
                fields.insert("result".into(), json!(""));
                fields.insert("api_error_status".into(), json!(null));
            }
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            id: "11111111-2222-4333-8444-555555555555".into(),
            model: DEFAULT_MODEL.into(),
            cwd: "/home/user/project".into(),
            permission_mode: "acceptEdits".into(),
        }
    }

    #[test]
    fn uuid_is_version_4_variant_1() {
        for _ in 0..100 {
            let id = uuid_v4();
            let parts: Vec<&str> = id.split('-').collect();
            let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            assert_eq!(lens, [8, 4, 4, 4, 12], "{id}");
            assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
            assert!(parts[2].starts_with('4'), "{id}");
            assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{id}");
        }
        assert_ne!(uuid_v4(), uuid_v4());
    }

    #[test]
    fn timestamp_matches_the_fixture_format() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_764_041_410_895), "2025-11-25T03:30:10.895Z");
        // A leap day, to exercise the March-based year of the algorithm.
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(timestamp(1_704_067_199_999), "2023-12-31T23:59:59.999Z");
    }

    #[test]
    fn every_line_has_type_session_and_uuid() {
        let s = session();
        let lines = [
            init(&s, "none", "/tmp", 1),
            assistant(&s, "msg", vec![text_block("hi")], 0),
            assistant_api_error(&s, 401, "bad key", 0),
            user_tool_result(&s, "toolu", "ok", false, json!({}), 0),
            user_text(&s, "[Request interrupted by user]", 0),
            system(&s, "api_retry", Map::new()),
            stream_event(&s, "msg", json!({"type": "message_stop"})),
            result(
                &s,
                &Ending::Success { text: "x".into() },
                Tally {
                    num_turns: 1,
                    duration_ms: 1,
                    prior_cost_usd: 0.0,
                },
            ),
        ];
        for line in lines {
            assert!(line["type"].is_string(), "{line}");
            assert_eq!(line["session_id"], s.id, "{line}");
            assert_eq!(line["uuid"].as_str().map(str::len), Some(36), "{line}");
        }
    }

    #[test]
    fn init_is_long_and_names_the_session() {
        let line = init(&session(), "ANTHROPIC_API_KEY", "/tmp/t", 42);
        assert_eq!(line["subtype"], "init");
        assert_eq!(line["permissionMode"], "acceptEdits");
        assert_eq!(line["cwd"], "/home/user/project");
        assert_eq!(line["messaging_socket_path"], "/tmp/t/cc-socks/42.sock");
        assert!(
            line["tools"]
                .as_array()
                .is_some_and(|t| t.contains(&json!("Write")))
        );
        assert!(line.to_string().len() > 2000);
    }

    #[test]
    fn result_flags_follow_the_real_cli() {
        let s = session();
        let tally = Tally {
            num_turns: 2,
            duration_ms: 200,
            prior_cost_usd: 0.0,
        };
        let ok = result(
            &s,
            &Ending::Success {
                text: "done".into(),
            },
            tally,
        );
        assert_eq!(
            (ok["subtype"].as_str(), ok["is_error"].as_bool()),
            (Some("success"), Some(false))
        );
        assert_eq!(ok["result"], "done");
        assert_eq!(ok["terminal_reason"], "completed");

        let api = result(
            &s,
            &Ending::ApiError {
                status: 401,
                text: "no".into(),
            },
            tally,
        );
        assert_eq!(
            (api["subtype"].as_str(), api["is_error"].as_bool()),
            (Some("success"), Some(true))
        );
        assert_eq!(api["api_error_status"], 401);
        assert_eq!(api["total_cost_usd"], 0.0);

        let max = result(&s, &Ending::MaxTurns { limit: 2 }, tally);
        assert_eq!(max["subtype"], "error_max_turns");
        assert!(max.get("result").is_none());
        assert_eq!(max["errors"][0], "Reached maximum number of turns (2)");

        let int = result(&s, &Ending::Interrupted { in_tool: true }, tally);
        assert_eq!(int["subtype"], "error_during_execution");
        assert_eq!(int["is_error"], true);
        assert_eq!(int["terminal_reason"], "aborted_tools");
    }

    #[test]
    fn resumed_cost_is_cumulative() {
        let s = session();
        let tally = Tally {
            num_turns: 1,
            duration_ms: 1,
            prior_cost_usd: 1.0,
        };
        let line = result(
            &s,
            &Ending::Success {
                text: String::new(),
            },
            tally,
        );
        assert_eq!(
            line["total_cost_usd"].as_f64(),
            Some(1.0 + COST_PER_TURN_USD)
        );
    }
}
