//! Command line of the stand-in: the real CLI's flags (no IO).
//!
//! walkie builds the command from a template written for `claude`, so every flag the real
//! CLI takes must be accepted here, and flags we do not model are skipped. A flag that takes
//! a value must be known as such, or its value would be taken for the prompt.

/// `--output-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// The final result text only (the real CLI's default).
    #[default]
    Text,
    /// One JSON object, the `result` line, at the end.
    Json,
    /// One JSON line per event.
    StreamJson,
}

/// What the caller asked for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Options {
    /// `-p/--print`: headless mode.
    pub print: bool,
    /// Positional words joined by spaces; empty when none were given.
    pub prompt: String,
    pub output_format: OutputFormat,
    pub verbose: bool,
    pub permission_mode: Option<String>,
    pub resume: Option<String>,
    pub session_id: Option<String>,
    pub model: Option<String>,
    pub max_turns: Option<u32>,
    pub include_partial_messages: bool,
    /// `--input-format stream-json`: user messages and control lines on stdin, kept open.
    pub input_stream_json: bool,
    /// `--replay-user-messages`: echo each user message when it is taken in.
    pub replay_user_messages: bool,
    /// `--permission-prompt-tool stdio`: ask for approvals with control requests on stdout.
    pub permission_prompt_stdio: bool,
}

/// The process's job.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Play an agent run.
    Agent(Options),
    /// Be the `@grandchild` sleeper; `setsid` first when asked.
    SleepForever {
        setsid: bool,
    },
    Help,
    Version,
}

/// Arguments the real CLI would refuse.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UsageError {
    /// The caller prints it and exits 1, as the real CLI does for bad arguments.
    #[error("error: option '{0}' argument missing")]
    MissingValue(String),
    /// The caller prints it and exits 1.
    #[error("error: option '{flag}' argument '{value}' is invalid")]
    BadValue { flag: String, value: String },
}

/// Flags of the real CLI that consume the next argument; values of the ones we model are
/// read, the others skipped.
const SKIPPED_VALUE_FLAGS: &[&str] = &[
    "--append-system-prompt",
    "--system-prompt",
    "--add-dir",
    "--allowedTools",
    "--allowed-tools",
    "--disallowedTools",
    "--disallowed-tools",
    "--mcp-config",
    "--fallback-model",
    "--settings",
    "--setting-sources",
    "--max-budget-usd",
    "--agents",
    "--agent",
    "--betas",
    "--plugin-dir",
    "--tools",
    "--json-schema",
    "--effort",
    "--name",
];

pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Mode, UsageError> {
    let mut options = Options::default();
    let mut prompt_words = Vec::new();
    let mut sleep_forever = false;
    let mut setsid = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // `--flag=value` is the same as `--flag value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let value = |args: &mut I::IntoIter| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| UsageError::MissingValue(flag.clone()))
        };
        match flag.as_str() {
            "-p" | "--print" => options.print = true,
            "--verbose" => options.verbose = true,
            "--include-partial-messages" => options.include_partial_messages = true,
            "--replay-user-messages" => options.replay_user_messages = true,
            "--input-format" => {
                let v = value(&mut args)?;
                options.input_stream_json = match v.as_str() {
                    "text" => false,
                    "stream-json" => true,
                    _ => return Err(UsageError::BadValue { flag, value: v }),
                };
            }
            // Only the stdio prompt tool is modelled; an MCP tool name is taken as "none".
            "--permission-prompt-tool" => {
                options.permission_prompt_stdio = value(&mut args)? == "stdio";
            }
            "--output-format" => {
                let v = value(&mut args)?;
                options.output_format = match v.as_str() {
                    "text" => OutputFormat::Text,
                    "json" => OutputFormat::Json,
                    "stream-json" => OutputFormat::StreamJson,
                    _ => return Err(UsageError::BadValue { flag, value: v }),
                };
            }
            "--permission-mode" => options.permission_mode = Some(value(&mut args)?),
            "-r" | "--resume" => options.resume = Some(value(&mut args)?),
            "--session-id" => options.session_id = Some(value(&mut args)?),
            "--model" => options.model = Some(value(&mut args)?),
            "--max-turns" => {
                let v = value(&mut args)?;
                options.max_turns = Some(match v.parse() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(UsageError::BadValue { flag, value: v }),
                });
            }
            "--sleep-forever" => sleep_forever = true,
            "--setsid" => setsid = true,
            "-h" | "--help" => return Ok(Mode::Help),
            "-v" | "--version" => return Ok(Mode::Version),
            "--" => prompt_words.extend(args.by_ref()),
            f if SKIPPED_VALUE_FLAGS.contains(&f) => {
                value(&mut args)?;
            }
            f if f.starts_with('-') && f.len() > 1 => {} // unknown flag: ignored, as promised
            _ => prompt_words.push(arg),
        }
    }
    if sleep_forever {
        return Ok(Mode::SleepForever { setsid });
    }
    options.prompt = prompt_words.join(" ");
    Ok(Mode::Agent(options))
}

pub const HELP: &str = "\
Usage: fake-agent -p PROMPT [--output-format text|json|stream-json] [--verbose]
                  [--permission-mode MODE] [--resume ID | --session-id ID] [--model M]
                  [--max-turns N] [--include-partial-messages]
       fake-agent -p --input-format stream-json --output-format stream-json --verbose
                  [--permission-prompt-tool stdio] [--replay-user-messages] [...]
                  (user messages and control requests as JSON lines on stdin)

A stand-in for the Claude Code CLI in headless mode, for walkie's tests.
Scenario directives (@sleep=SECS, @fail, @stall, @flood=SIZE, ...) go in the prompt or in
FAKE_AGENT_DIRECTIVES; see tools/fake-agent/README.md.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(args: &[&str]) -> Options {
        match parse(args.iter().map(|a| a.to_string())) {
            Ok(Mode::Agent(o)) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn walkie_default_template() {
        let o = agent(&[
            "-p",
            "fix the test @sleep=1",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-mode",
            "acceptEdits",
        ]);
        assert!(o.print && o.verbose);
        assert_eq!(o.prompt, "fix the test @sleep=1");
        assert_eq!(o.output_format, OutputFormat::StreamJson);
        assert_eq!(o.permission_mode.as_deref(), Some("acceptEdits"));
        assert_eq!(o.resume, None);
    }

    #[test]
    fn resume_session_model_turns() {
        let o = agent(&[
            "-p",
            "again",
            "--resume",
            "abc",
            "--session-id=def",
            "--model",
            "sonnet",
            "--max-turns=4",
            "--include-partial-messages",
        ]);
        assert_eq!(o.resume.as_deref(), Some("abc"));
        assert_eq!(o.session_id.as_deref(), Some("def"));
        assert_eq!(o.model.as_deref(), Some("sonnet"));
        assert_eq!(o.max_turns, Some(4));
        assert!(o.include_partial_messages);
        assert_eq!(o.output_format, OutputFormat::Text);
    }

    #[test]
    fn unknown_flags_are_ignored_and_known_value_flags_skip_their_value() {
        let o = agent(&[
            "--bare",
            "-p",
            "--append-system-prompt",
            "be brief",
            "--add-dir",
            "/x",
            "--dangerously-skip-permissions",
            "hello",
            "world",
        ]);
        assert_eq!(o.prompt, "hello world");
    }

    #[test]
    fn walkie_duplex_flags() {
        let o = agent(&[
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-prompt-tool",
            "stdio",
            "--replay-user-messages",
            "--permission-mode",
            "acceptEdits",
        ]);
        assert!(o.input_stream_json && o.replay_user_messages && o.permission_prompt_stdio);
        assert_eq!(o.prompt, "");
        let o = agent(&[
            "-p",
            "x",
            "--input-format=text",
            "--permission-prompt-tool",
            "mcp__x",
        ]);
        assert!(!o.input_stream_json && !o.permission_prompt_stdio);
        assert_eq!(o.prompt, "x");
        assert!(matches!(
            parse(["--input-format", "yaml"].map(String::from)),
            Err(UsageError::BadValue { .. })
        ));
    }

    #[test]
    fn sleeper_mode() {
        let args = ["--sleep-forever", "--setsid"].map(String::from);
        assert_eq!(parse(args), Ok(Mode::SleepForever { setsid: true }));
    }

    #[test]
    fn bad_arguments() {
        let err = |args: &[&str]| parse(args.iter().map(|a| a.to_string())).unwrap_err();
        assert_eq!(
            err(&["-p", "x", "--output-format", "yaml"]),
            UsageError::BadValue {
                flag: "--output-format".into(),
                value: "yaml".into()
            }
        );
        assert_eq!(
            err(&["-p", "x", "--resume"]),
            UsageError::MissingValue("--resume".into())
        );
        assert!(matches!(
            err(&["--max-turns", "zero"]),
            UsageError::BadValue { .. }
        ));
    }
}
