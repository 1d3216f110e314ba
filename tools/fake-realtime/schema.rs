//! The GA shapes of every client event, and a strict validator for them.
//!
//! Pure data and functions, no IO, no thread of its own. The real server rejects unknown or
//! beta-style keys (`unknown_parameter`), wrong JSON types (`invalid_type`), values outside an
//! enum (`invalid_value`) and missing required fields (`missing_required_parameter`), naming
//! the offending path in `error.param`. This fake must be at least as strict, otherwise a
//! walkie that sends a beta key would pass its tests and fail against the real API. Shapes
//! follow the official SDK's `openai.types.realtime` params (GA, 2025-08 and later).

use serde_json::{Map, Value};

/// One field of an object shape.
pub struct Field {
    pub name: &'static str,
    pub shape: Shape,
    pub required: bool,
}

/// A JSON shape the validator understands.
pub enum Shape {
    /// Anything (JSON Schema of a tool, prompt variables).
    Any,
    Str,
    Int,
    Num,
    Bool,
    /// A string out of a fixed set.
    Enum(&'static [&'static str]),
    /// An integer out of a fixed set (sample rates).
    IntIn(&'static [i64]),
    /// An object with exactly these fields (no others).
    Obj(&'static [Field]),
    /// An object whose `type` picks the shape that validates it.
    Tagged(&'static [(&'static str, Shape)]),
    /// An object with free keys whose values all have this shape (`metadata`).
    Map(&'static Shape),
    Array(&'static Shape),
    Nullable(&'static Shape),
    /// Alternatives chosen by the JSON kind of the value (string vs object vs number).
    Either(&'static [Shape]),
    /// A check that needs code (a message's role decides which parts it may hold).
    Custom(fn(&Value, &str) -> Result<(), SchemaError>),
}

/// Why a value does not fit its shape; becomes an `error` event with `param` = `path`.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaError {
    pub code: &'static str,
    pub message: String,
    pub param: String,
}

const fn req(name: &'static str, shape: Shape) -> Field {
    Field {
        name,
        shape,
        required: true,
    }
}

const fn opt(name: &'static str, shape: Shape) -> Field {
    Field {
        name,
        shape,
        required: false,
    }
}

pub const VOICES: &[&str] = &[
    "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar",
];

const AUDIO_FORMAT: Shape = Shape::Tagged(&[
    (
        "audio/pcm",
        Shape::Obj(&[req("type", Shape::Str), opt("rate", Shape::IntIn(&[24000]))]),
    ),
    ("audio/pcmu", Shape::Obj(&[req("type", Shape::Str)])),
    ("audio/pcma", Shape::Obj(&[req("type", Shape::Str)])),
]);

const TURN_DETECTION: Shape = Shape::Nullable(&Shape::Tagged(&[
    (
        "server_vad",
        Shape::Obj(&[
            req("type", Shape::Str),
            opt("threshold", Shape::Num),
            opt("prefix_padding_ms", Shape::Int),
            opt("silence_duration_ms", Shape::Int),
            opt("idle_timeout_ms", Shape::Nullable(&Shape::Int)),
            opt("create_response", Shape::Bool),
            opt("interrupt_response", Shape::Bool),
        ]),
    ),
    (
        "semantic_vad",
        Shape::Obj(&[
            req("type", Shape::Str),
            opt("eagerness", Shape::Enum(&["low", "medium", "high", "auto"])),
            opt("create_response", Shape::Bool),
            opt("interrupt_response", Shape::Bool),
        ]),
    ),
]));

const TRANSCRIPTION: Shape = Shape::Nullable(&Shape::Obj(&[
    opt(
        "model",
        Shape::Enum(&[
            "whisper-1",
            "gpt-4o-mini-transcribe",
            "gpt-4o-transcribe",
            "gpt-4o-transcribe-diarize",
        ]),
    ),
    opt("language", Shape::Str),
    opt("prompt", Shape::Str),
]));

const AUDIO_INPUT: Shape = Shape::Obj(&[
    opt("format", AUDIO_FORMAT),
    opt(
        "noise_reduction",
        Shape::Nullable(&Shape::Obj(&[opt(
            "type",
            Shape::Enum(&["near_field", "far_field"]),
        )])),
    ),
    opt("transcription", TRANSCRIPTION),
    opt("turn_detection", TURN_DETECTION),
]);

const VOICE: Shape = Shape::Either(&[Shape::Enum(VOICES), Shape::Obj(&[req("id", Shape::Str)])]);

const AUDIO_OUTPUT: Shape = Shape::Obj(&[
    opt("format", AUDIO_FORMAT),
    opt("speed", Shape::Num),
    opt("voice", VOICE),
]);

const OUTPUT_MODALITIES: Shape = Shape::Array(&Shape::Enum(&["text", "audio"]));

const MAX_OUTPUT_TOKENS: Shape = Shape::Either(&[Shape::Int, Shape::Enum(&["inf"])]);

const TOOL_CHOICE: Shape = Shape::Either(&[
    Shape::Enum(&["none", "auto", "required"]),
    Shape::Tagged(&[
        (
            "function",
            Shape::Obj(&[req("type", Shape::Str), req("name", Shape::Str)]),
        ),
        (
            "mcp",
            Shape::Obj(&[
                req("type", Shape::Str),
                req("server_label", Shape::Str),
                opt("name", Shape::Nullable(&Shape::Str)),
            ]),
        ),
    ]),
]);

const TOOLS: Shape = Shape::Array(&Shape::Tagged(&[
    (
        "function",
        Shape::Obj(&[
            req("type", Shape::Str),
            req("name", Shape::Str),
            opt("description", Shape::Str),
            opt("parameters", Shape::Any),
        ]),
    ),
    // MCP tools have a large, evolving shape walkie never uses: accept them whole.
    ("mcp", Shape::Any),
]));

const PROMPT: Shape = Shape::Nullable(&Shape::Obj(&[
    req("id", Shape::Str),
    opt("variables", Shape::Any),
    opt("version", Shape::Nullable(&Shape::Str)),
]));

/// `session` of `session.update` (RealtimeSessionCreateRequest).
pub const SESSION: Shape = Shape::Obj(&[
    req("type", Shape::Enum(&["realtime"])),
    opt(
        "audio",
        Shape::Obj(&[opt("input", AUDIO_INPUT), opt("output", AUDIO_OUTPUT)]),
    ),
    opt(
        "include",
        Shape::Nullable(&Shape::Array(&Shape::Enum(&[
            "item.input_audio_transcription.logprobs",
        ]))),
    ),
    opt("instructions", Shape::Str),
    opt("max_output_tokens", MAX_OUTPUT_TOKENS),
    opt("model", Shape::Str),
    opt("output_modalities", OUTPUT_MODALITIES),
    opt("parallel_tool_calls", Shape::Bool),
    opt("prompt", PROMPT),
    opt("reasoning", Shape::Any),
    opt("tool_choice", TOOL_CHOICE),
    opt("tools", TOOLS),
    opt(
        "tracing",
        Shape::Nullable(&Shape::Either(&[
            Shape::Enum(&["auto"]),
            Shape::Obj(&[
                opt("group_id", Shape::Str),
                opt("metadata", Shape::Any),
                opt("workflow_name", Shape::Str),
            ]),
        ])),
    ),
    opt(
        "truncation",
        Shape::Either(&[
            Shape::Enum(&["auto", "disabled"]),
            Shape::Tagged(&[(
                "retention_ratio",
                Shape::Obj(&[
                    req("type", Shape::Str),
                    req("retention_ratio", Shape::Num),
                    opt("token_limits", Shape::Any),
                ]),
            )]),
        ]),
    ),
]);

const ITEM_ID: Field = opt("id", Shape::Str);
const ITEM_OBJECT: Field = opt("object", Shape::Enum(&["realtime.item"]));
const ITEM_STATUS: Field = opt(
    "status",
    Shape::Enum(&["completed", "incomplete", "in_progress"]),
);

const USER_MESSAGE: Shape = Shape::Obj(&[
    req("type", Shape::Str),
    req("role", Shape::Str),
    req(
        "content",
        Shape::Array(&Shape::Tagged(&[
            (
                "input_text",
                Shape::Obj(&[req("type", Shape::Str), req("text", Shape::Str)]),
            ),
            (
                "input_audio",
                Shape::Obj(&[
                    req("type", Shape::Str),
                    req("audio", Shape::Str),
                    opt("transcript", Shape::Nullable(&Shape::Str)),
                ]),
            ),
            (
                "input_image",
                Shape::Obj(&[
                    req("type", Shape::Str),
                    req("image_url", Shape::Str),
                    opt("detail", Shape::Enum(&["auto", "low", "high"])),
                ]),
            ),
        ])),
    ),
    ITEM_ID,
    ITEM_OBJECT,
    ITEM_STATUS,
]);

const SYSTEM_MESSAGE: Shape = Shape::Obj(&[
    req("type", Shape::Str),
    req("role", Shape::Str),
    req(
        "content",
        Shape::Array(&Shape::Tagged(&[(
            "input_text",
            Shape::Obj(&[req("type", Shape::Str), req("text", Shape::Str)]),
        )])),
    ),
    ITEM_ID,
    ITEM_OBJECT,
    ITEM_STATUS,
]);

// Assistant audio cannot be recreated: only text parts are accepted for assistant items.
const ASSISTANT_MESSAGE: Shape = Shape::Obj(&[
    req("type", Shape::Str),
    req("role", Shape::Str),
    req(
        "content",
        Shape::Array(&Shape::Tagged(&[(
            "output_text",
            Shape::Obj(&[req("type", Shape::Str), req("text", Shape::Str)]),
        )])),
    ),
    ITEM_ID,
    ITEM_OBJECT,
    ITEM_STATUS,
]);

fn validate_message(value: &Value, path: &str) -> Result<(), SchemaError> {
    let role = value.get("role");
    let shape = match role.and_then(Value::as_str) {
        Some("user") => &USER_MESSAGE,
        Some("system") => &SYSTEM_MESSAGE,
        Some("assistant") => &ASSISTANT_MESSAGE,
        Some(other) => {
            return Err(invalid_value(
                other,
                &["user", "system", "assistant"],
                &join(path, "role"),
            ));
        }
        None if role.is_some() => {
            return Err(invalid_type(
                &join(path, "role"),
                "a string",
                role.unwrap_or(&Value::Null),
            ));
        }
        None => return Err(missing(&join(path, "role"))),
    };
    validate(value, shape, path)
}

/// A conversation item a client may create.
pub const ITEM: Shape = Shape::Tagged(&[
    ("message", Shape::Custom(validate_message)),
    (
        "function_call",
        Shape::Obj(&[
            req("type", Shape::Str),
            req("call_id", Shape::Str),
            req("name", Shape::Str),
            req("arguments", Shape::Str),
            ITEM_ID,
            ITEM_OBJECT,
            ITEM_STATUS,
        ]),
    ),
    (
        "function_call_output",
        Shape::Obj(&[
            req("type", Shape::Str),
            req("call_id", Shape::Str),
            req("output", Shape::Str),
            ITEM_ID,
            ITEM_OBJECT,
            ITEM_STATUS,
        ]),
    ),
]);

/// `response` of `response.create` (RealtimeResponseCreateParams).
const RESPONSE_PARAMS: Shape = Shape::Obj(&[
    opt(
        "audio",
        Shape::Obj(&[opt(
            "output",
            Shape::Obj(&[opt("format", AUDIO_FORMAT), opt("voice", VOICE)]),
        )]),
    ),
    opt("conversation", Shape::Str),
    opt("input", Shape::Array(&Shape::Any)),
    opt("instructions", Shape::Str),
    opt("max_output_tokens", MAX_OUTPUT_TOKENS),
    opt("metadata", Shape::Nullable(&Shape::Map(&Shape::Str))),
    opt("output_modalities", OUTPUT_MODALITIES),
    opt("prompt", PROMPT),
    opt("tool_choice", TOOL_CHOICE),
    opt("tools", TOOLS),
]);

const TYPE: Field = req("type", Shape::Str);
const EVENT_ID: Field = opt("event_id", Shape::Str);

/// The shape of a client event by its `type`; `None` for a type the GA API does not have.
pub fn client_event(event_type: &str) -> Option<&'static Shape> {
    const SESSION_UPDATE: Shape = Shape::Obj(&[TYPE, EVENT_ID, req("session", SESSION)]);
    const APPEND: Shape = Shape::Obj(&[TYPE, EVENT_ID, req("audio", Shape::Str)]);
    const BARE: Shape = Shape::Obj(&[TYPE, EVENT_ID]);
    const ITEM_CREATE: Shape = Shape::Obj(&[
        TYPE,
        EVENT_ID,
        opt("previous_item_id", Shape::Nullable(&Shape::Str)),
        req("item", ITEM),
    ]);
    const TRUNCATE: Shape = Shape::Obj(&[
        TYPE,
        EVENT_ID,
        req("item_id", Shape::Str),
        req("content_index", Shape::Int),
        req("audio_end_ms", Shape::Int),
    ]);
    const BY_ITEM_ID: Shape = Shape::Obj(&[TYPE, EVENT_ID, req("item_id", Shape::Str)]);
    const RESPONSE_CREATE: Shape = Shape::Obj(&[TYPE, EVENT_ID, opt("response", RESPONSE_PARAMS)]);
    const RESPONSE_CANCEL: Shape = Shape::Obj(&[TYPE, EVENT_ID, opt("response_id", Shape::Str)]);
    Some(match event_type {
        "session.update" => &SESSION_UPDATE,
        "input_audio_buffer.append" => &APPEND,
        "input_audio_buffer.commit" | "input_audio_buffer.clear" => &BARE,
        "conversation.item.create" => &ITEM_CREATE,
        "conversation.item.truncate" => &TRUNCATE,
        "conversation.item.delete" | "conversation.item.retrieve" => &BY_ITEM_ID,
        "response.create" => &RESPONSE_CREATE,
        "response.cancel" => &RESPONSE_CANCEL,
        _ => return None,
    })
}

/// Every client event type the fake knows, for the `unknown_event` error message.
pub const CLIENT_EVENT_TYPES: &[&str] = &[
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "response.create",
    "response.cancel",
];

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a decimal",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid_type(path: &str, expected: &str, got: &Value) -> SchemaError {
    SchemaError {
        code: "invalid_type",
        message: format!(
            "Invalid type for '{path}': expected {expected}, but got {} instead.",
            kind_of(got)
        ),
        param: path.to_owned(),
    }
}

fn invalid_value(got: &str, supported: &[&str], path: &str) -> SchemaError {
    let list: Vec<String> = supported.iter().map(|s| format!("'{s}'")).collect();
    SchemaError {
        code: "invalid_value",
        message: format!(
            "Invalid value: '{got}'. Supported values are: {}.",
            list.join(", ")
        ),
        param: path.to_owned(),
    }
}

fn missing(path: &str) -> SchemaError {
    SchemaError {
        code: "missing_required_parameter",
        message: format!("Missing required parameter: '{path}'."),
        param: path.to_owned(),
    }
}

/// What JSON kind a shape accepts, to pick a branch of [`Shape::Either`].
fn accepts_kind(shape: &Shape, value: &Value) -> bool {
    match shape {
        Shape::Any | Shape::Custom(_) => true,
        Shape::Str | Shape::Enum(_) => value.is_string(),
        Shape::Int | Shape::IntIn(_) => value.is_i64() || value.is_u64(),
        Shape::Num => value.is_number(),
        Shape::Bool => value.is_boolean(),
        Shape::Obj(_) | Shape::Tagged(_) | Shape::Map(_) => value.is_object(),
        Shape::Array(_) => value.is_array(),
        Shape::Nullable(inner) => value.is_null() || accepts_kind(inner, value),
        Shape::Either(options) => options.iter().any(|o| accepts_kind(o, value)),
    }
}

fn expected_name(shape: &Shape) -> &'static str {
    match shape {
        Shape::Any | Shape::Custom(_) => "a value",
        Shape::Str | Shape::Enum(_) => "a string",
        Shape::Int | Shape::IntIn(_) => "an integer",
        Shape::Num => "a number",
        Shape::Bool => "a boolean",
        Shape::Obj(_) | Shape::Tagged(_) | Shape::Map(_) => "an object",
        Shape::Array(_) => "an array",
        Shape::Nullable(inner) => expected_name(inner),
        Shape::Either(_) => "one of the supported types",
    }
}

fn validate_fields(
    map: &Map<String, Value>,
    fields: &[Field],
    path: &str,
) -> Result<(), SchemaError> {
    for (key, value) in map {
        let Some(field) = fields.iter().find(|f| f.name == key) else {
            let param = join(path, key);
            return Err(SchemaError {
                code: "unknown_parameter",
                message: format!("Unknown parameter: '{param}'."),
                param,
            });
        };
        validate(value, &field.shape, &join(path, key))?;
    }
    match fields
        .iter()
        .find(|f| f.required && !map.contains_key(f.name))
    {
        Some(field) => Err(missing(&join(path, field.name))),
        None => Ok(()),
    }
}

/// Checks `value` against `shape`; `path` is where `value` sits (`session.audio`), used in
/// the error's `param` the way the real server reports it.
pub fn validate(value: &Value, shape: &Shape, path: &str) -> Result<(), SchemaError> {
    match shape {
        Shape::Any => Ok(()),
        Shape::Custom(check) => check(value, path),
        Shape::Nullable(_) if value.is_null() => Ok(()),
        Shape::Nullable(inner) => validate(value, inner, path),
        Shape::Either(options) => match options.iter().find(|o| accepts_kind(o, value)) {
            Some(option) => validate(value, option, path),
            None => Err(invalid_type(path, expected_name(shape), value)),
        },
        _ if !accepts_kind(shape, value) => Err(invalid_type(path, expected_name(shape), value)),
        Shape::Enum(allowed) => {
            let got = value.as_str().unwrap_or_default();
            if allowed.contains(&got) {
                Ok(())
            } else {
                Err(invalid_value(got, allowed, path))
            }
        }
        Shape::IntIn(allowed) => {
            let got = value.as_i64().unwrap_or_default();
            if allowed.contains(&got) {
                Ok(())
            } else {
                let names: Vec<String> = allowed.iter().map(i64::to_string).collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                Err(invalid_value(&got.to_string(), &names, path))
            }
        }
        Shape::Obj(fields) => match value.as_object() {
            Some(map) => validate_fields(map, fields, path),
            None => Err(invalid_type(path, "an object", value)),
        },
        Shape::Tagged(variants) => {
            let type_path = join(path, "type");
            let tag = match value.get("type") {
                None => return Err(missing(&type_path)),
                Some(Value::String(tag)) => tag.as_str(),
                Some(other) => return Err(invalid_type(&type_path, "a string", other)),
            };
            match variants.iter().find(|(name, _)| *name == tag) {
                Some((_, variant)) => validate(value, variant, path),
                None => {
                    let names: Vec<&str> = variants.iter().map(|(name, _)| *name).collect();
                    Err(invalid_value(tag, &names, &type_path))
                }
            }
        }
        Shape::Map(inner) => {
            for (key, item) in value.as_object().into_iter().flatten() {
                validate(item, inner, &join(path, key))?;
            }
            Ok(())
        }
        Shape::Array(inner) => {
            for (index, item) in value.as_array().into_iter().flatten().enumerate() {
                validate(item, inner, &format!("{path}[{index}]"))?;
            }
            Ok(())
        }
        Shape::Str | Shape::Int | Shape::Num | Shape::Bool => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(event: Value) -> Result<(), SchemaError> {
        let event_type = event["type"].as_str().unwrap_or_default().to_owned();
        let shape = client_event(&event_type).expect("known type");
        validate(&event, shape, "")
    }

    #[test]
    fn accepts_the_ga_session_update_walkie_sends() {
        let event = json!({"type":"session.update","event_id":"e1","session":{
            "type":"realtime","instructions":"hi","output_modalities":["audio"],
            "audio":{"input":{"format":{"type":"audio/pcm","rate":24000},"turn_detection":null,
                              "transcription":{"model":"gpt-4o-mini-transcribe"}},
                     "output":{"format":{"type":"audio/pcm","rate":24000},"voice":"marin"}},
            "tools":[{"type":"function","name":"start_task","description":"d",
                      "parameters":{"type":"object","properties":{}}}],
            "tool_choice":"auto"}});
        assert_eq!(check(event), Ok(()));
    }

    #[test]
    fn rejects_beta_keys_with_their_path() {
        for (session, param) in [
            (
                json!({"type":"realtime","modalities":["audio"]}),
                "session.modalities",
            ),
            (json!({"type":"realtime","voice":"marin"}), "session.voice"),
            (
                json!({"type":"realtime","input_audio_format":"pcm16"}),
                "session.input_audio_format",
            ),
            (
                json!({"type":"realtime","turn_detection":null}),
                "session.turn_detection",
            ),
            (
                json!({"type":"realtime","temperature":0.8}),
                "session.temperature",
            ),
            (
                json!({"type":"realtime","audio":{"input":{"turn_detection":{"type":"server_vad","foo":1}}}}),
                "session.audio.input.turn_detection.foo",
            ),
        ] {
            let error = check(json!({"type":"session.update","session":session})).unwrap_err();
            assert_eq!(error.code, "unknown_parameter");
            assert_eq!(error.param, param);
        }
    }

    #[test]
    fn requires_session_type_and_checks_enums_and_types() {
        let error = check(json!({"type":"session.update","session":{}})).unwrap_err();
        assert_eq!(
            (error.code, error.param.as_str()),
            ("missing_required_parameter", "session.type")
        );
        let error = check(json!({"type":"session.update","session":{"type":"realtime",
            "audio":{"output":{"voice":"nova"}}}}))
        .unwrap_err();
        assert_eq!(error.code, "invalid_value");
        assert_eq!(error.param, "session.audio.output.voice");
        let error = check(json!({"type":"session.update","session":{"type":"realtime",
            "audio":{"input":{"format":{"type":"audio/pcm","rate":16000}}}}}))
        .unwrap_err();
        assert_eq!(error.code, "invalid_value");
        let error =
            check(json!({"type":"session.update","session":{"type":"realtime","instructions":5}}))
                .unwrap_err();
        assert_eq!(error.code, "invalid_type");
        assert_eq!(error.param, "session.instructions");
    }

    #[test]
    fn message_parts_depend_on_the_role() {
        let ok = |role: &str, part: &str| {
            check(
                json!({"type":"conversation.item.create","item":{"type":"message","role":role,
                "content":[{"type":part,"text":"x"}]}}),
            )
        };
        assert_eq!(ok("user", "input_text"), Ok(()));
        assert_eq!(ok("system", "input_text"), Ok(()));
        assert_eq!(ok("assistant", "output_text"), Ok(()));
        let error = ok("assistant", "input_text").unwrap_err();
        assert_eq!(
            (error.code, error.param.as_str()),
            ("invalid_value", "item.content[0].type")
        );
        assert_eq!(
            ok("system", "output_text").unwrap_err().code,
            "invalid_value"
        );
        assert_eq!(ok("tool", "input_text").unwrap_err().param, "item.role");
        let audio = check(
            json!({"type":"conversation.item.create","item":{"type":"message",
            "role":"assistant","content":[{"type":"output_audio","audio":"AAAA"}]}}),
        );
        assert_eq!(audio.unwrap_err().code, "invalid_value");
    }

    #[test]
    fn rejects_unknown_top_level_fields_and_missing_ones() {
        let error = check(json!({"type":"response.create","modalities":["text"]})).unwrap_err();
        assert_eq!(
            (error.code, error.param.as_str()),
            ("unknown_parameter", "modalities")
        );
        let error = check(json!({"type":"conversation.item.truncate","item_id":"i"})).unwrap_err();
        assert_eq!(error.code, "missing_required_parameter");
        let error = check(json!({"type":"conversation.item.create","item":{
            "type":"function_call_output","output":"x"}}))
        .unwrap_err();
        assert_eq!(error.param, "item.call_id");
        assert_eq!(
            check(
                json!({"type":"response.create","response":{"conversation":"none",
                "metadata":{"k":"v"},"output_modalities":["text"]}})
            ),
            Ok(())
        );
    }
}
