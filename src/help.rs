//! `--help` for every command, and "did you mean" for a misspelled one.
//!
//! [`TOPICS`] maps each command path (`"ctl start"`) to its help text; `walkie X Y --help`,
//! `walkie X Y -h` and `walkie help X Y` print the most specific topic the words reach. A
//! command added to the command line gets its entry here.

/// Command path → help text (usage line first).
pub const TOPICS: &[(&str, &str)] = &[
    (
        "run",
        "usage: walkie run [--config FILE] [--trace FILE]

Runs the daemon in the foreground: the button, the microphone and speaker, the link to the
Realtime API, and the agents. systemd runs exactly this (see docs/PI.md). Stop it with
Ctrl-C or SIGTERM: running agents are interrupted, the registry is saved.

  --config FILE   the configuration (default: $WALKIE_CONFIG, else
                  ~/.config/walkie/config.toml, else the built-in defaults)
  --trace FILE    write every Realtime event sent and received to FILE, one JSON line
                  each, audio elided

exit codes: 0 stopped cleanly, 1 failure, 2 configuration error",
    ),
    (
        "ctl",
        "usage: walkie ctl COMMAND [ARGS]

Talks to the running daemon over its control socket ($XDG_RUNTIME_DIR/walkie/control.sock,
or /tmp/walkie-UID/ when XDG_RUNTIME_DIR is unset).

commands:
  status [--json]                        link, audio, button, task counts, uptime
  tasks [--json]                         the task registry
  start [--name NAME] [--project P] PROMPT...   start a task
  continue NAME PROMPT...                a follow-up in the task's agent session
  cancel NAME                            stop a task and everything it started
  interrupt NAME                         end the agent's current turn, keep its session
  approve NAME [--always]                allow what the task's agent asked to do
  deny NAME [REASON]                     refuse it; the agent is told REASON
  result NAME [--json]                   a finished task's summary and details
  logs NAME [--follow]                   a task's agent output
  events [--json]                        task events as they happen
  say TEXT...                            a typed user turn instead of a spoken one
  transcript [--json]                    the recent conversation
  press | release                        the push-to-talk button, from software

`walkie ctl COMMAND --help` says more. A NAME may be a unique prefix or words of the name.
exit codes: 0 ok, 1 the daemon refused, 2 usage error, 3 the daemon is not running",
    ),
    (
        "ctl status",
        "usage: walkie ctl status [--json]

The link (connected, connecting, backoff, failed, disabled) and why, the audio devices and
the button (ok, opening, failed, disabled), running and finished tasks, uptime.",
    ),
    (
        "ctl tasks",
        "usage: walkie ctl tasks [--json]

Every task in the registry: name, state, how long ago, and its summary. --json prints the
full records (name, state, project, prompt, pid, started_at, ended_at, exit_code, summary,
session_id, files_changed, ...).",
    ),
    (
        "ctl start",
        "usage: walkie ctl start [--name NAME] [--project PROJECT] PROMPT...

Starts a task, exactly as the voice tool does: an agent from agent.command with PROMPT, in
the project's directory ([projects] in the configuration) or a fresh scratch directory.
Prints the task's name (from --name, else from the prompt). Refused when agent.max_running
tasks are running.",
    ),
    (
        "ctl continue",
        "usage: walkie ctl continue NAME PROMPT...

A follow-up in the task's agent session (the agent's --resume): the task runs again with
what it knew.",
    ),
    (
        "ctl cancel",
        "usage: walkie ctl cancel NAME

Stops the task and every process it started: SIGINT, then SIGTERM, then SIGKILL,
agent.cancel_grace_ms apart.",
    ),
    (
        "ctl interrupt",
        "usage: walkie ctl interrupt NAME

Ends the agent's current turn, as a person pressing Esc would: its tools stop, the turn ends
as interrupted, and the agent process and its session stay, ready for the next message
(continue, or message_task by voice). Needs agent.protocol \"claude\". `cancel` stops
everything instead.",
    ),
    (
        "ctl approve",
        "usage: walkie ctl approve NAME [--always]

Allows what the task's agent waits to do (its oldest permission request: the command to run,
the file to write). --always also adds the rule the agent suggested, so it does not ask again
for the same; the Claude CLI may keep such a rule in the project's .claude/settings.local.json,
so it outlives the task. You are the user here: no spoken answer is needed. `walkie ctl tasks`
shows what a waiting task asks.",
    ),
    (
        "ctl deny",
        "usage: walkie ctl deny NAME [REASON...]

Refuses what the task's agent waits to do (its oldest permission request). The agent is told
\"The user said no: REASON\" and goes on without that tool.",
    ),
    (
        "ctl result",
        "usage: walkie ctl result NAME [--json]

A finished task's summary, outcome, changed files, cost and where its full output is.",
    ),
    (
        "ctl logs",
        "usage: walkie ctl logs NAME [--follow|-f]

The agent's output so far; --follow keeps printing until the task ends.",
    ),
    (
        "ctl events",
        "usage: walkie ctl events [--json]

Prints task events (started, finished with their summary) as they happen, until Ctrl-C.",
    ),
    (
        "ctl say",
        "usage: walkie ctl say TEXT...

A typed user turn: the model answers it as if you had said it.",
    ),
    (
        "ctl transcript",
        "usage: walkie ctl transcript [--json]

The recent conversation: what you said (transcribed) and what walkie answered.",
    ),
    (
        "ctl press",
        "usage: walkie ctl press | walkie ctl release

Presses and releases the push-to-talk button from software (desktop hotkeys, scripts): the
same as the real button, in button.mode.",
    ),
    (
        "ctl release",
        "usage: walkie ctl press | walkie ctl release

Presses and releases the push-to-talk button from software (desktop hotkeys, scripts): the
same as the real button, in button.mode.",
    ),
    (
        "doctor",
        "usage: walkie doctor [--config FILE]

Checks the setup the way the service will run it — its unit and environment file
(~/.config/walkie/env), not your shell — one line each: pass, warn or FAIL, with the fix.
The configuration, the API key and the Realtime endpoint, both audio devices opened at
24 kHz mono, the button device and its key, real-time rights, the agent (found, answers
--version, logged in), projects, directories, the service unit.

exit codes: 0 nothing failed (warnings allowed), 1 something failed, 2 configuration error",
    ),
    (
        "devices",
        "usage: walkie devices

Lists the ALSA PCMs (the names audio.capture_device and audio.playback_device take) and the
input devices under /dev/input, with whether each has button.key.",
    ),
    (
        "button",
        "usage: walkie button learn [--device PATH] [--timeout SECONDS]

  learn   press the key you want as the push-to-talk button; prints the device and the key,
          and the two [button] lines for the configuration",
    ),
    (
        "button learn",
        "usage: walkie button learn [--device PATH] [--timeout SECONDS]

Waits for a key press on any input device you can read (or only on PATH: a device node, or a
FIFO of input_event records) and prints the device — by its stable /dev/input/by-id/ name —
the key's name and code, and the two lines to put under [button]. Reading /dev/input needs
the `input` group (then a new login).

  --device PATH       listen to this device only
  --timeout SECONDS   give up after this long (default 60)

exit codes: 0 a key was pressed, 1 no device readable or nothing pressed in time",
    ),
    (
        "config",
        "usage: walkie config check [FILE] | walkie config example | walkie config init

  check [FILE]   reads the configuration (FILE, or where walkie run would look) and reports
                 every error with its line; exit code 2 when there is one
  example        prints every key with its default and one line of documentation
  init           writes that example to ~/.config/walkie/config.toml (creating the
                 directory), unless a configuration is already there",
    ),
    (
        "config check",
        "usage: walkie config check [FILE]

Reads the configuration (FILE, else $WALKIE_CONFIG, else ~/.config/walkie/config.toml) and
reports every error in it, one line each with the line number, in file order.

exit codes: 0 valid, 2 errors",
    ),
    (
        "config example",
        "usage: walkie config example

Prints a configuration with every key at its default and one line of documentation each
(docs/CONFIGURATION.md has the full reference).",
    ),
    (
        "config init",
        "usage: walkie config init [--config FILE]

Writes the example configuration to FILE (default ~/.config/walkie/config.toml, or
$WALKIE_CONFIG), creating its directory. Never overwrites an existing file.

exit codes: 0 written, 1 a file is already there or cannot be written",
    ),
];

/// The help text for the most specific topic `words` reach (`["ctl", "start", "x"]` →
/// "ctl start"); None when the first word is no command.
pub fn topic(words: &[&str]) -> Option<&'static str> {
    (1..=words.len().min(2)).rev().find_map(|n| {
        let path = words[..n].join(" ");
        TOPICS
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, text)| *text)
    })
}

/// The subcommands of `parent` ("" for the top level, "ctl", "config", "button").
pub fn subcommands(parent: &str) -> Vec<&'static str> {
    TOPICS
        .iter()
        .filter_map(|(path, _)| match parent {
            "" => (!path.contains(' ')).then_some(*path),
            p => path.strip_prefix(p)?.strip_prefix(' '),
        })
        .collect()
}

/// " (did you mean \"X\"?)" when a known command is within a typo of `word`.
pub fn suggestion(word: &str, parent: &str) -> String {
    let mut candidates = subcommands(parent);
    if parent.is_empty() {
        candidates.push("help");
    }
    match crate::config::closest(word, candidates.into_iter()) {
        Some(close) => format!(" (did you mean \"{close}\"?)"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_topic_is_chosen() {
        assert!(
            topic(&["ctl", "start", "fix", "it"])
                .unwrap()
                .starts_with("usage: walkie ctl start")
        );
        assert!(
            topic(&["ctl", "nonsense"])
                .unwrap()
                .starts_with("usage: walkie ctl COMMAND")
        );
        assert!(
            topic(&["config", "check", "f"])
                .unwrap()
                .starts_with("usage: walkie config check")
        );
        assert_eq!(topic(&["nonsense"]), None);
        for (path, text) in TOPICS {
            assert!(text.starts_with("usage: walkie "), "{path}");
        }
    }

    #[test]
    fn typos_get_a_suggestion() {
        assert_eq!(suggestion("stauts", "ctl"), " (did you mean \"status\"?)");
        assert_eq!(suggestion("doctr", ""), " (did you mean \"doctor\"?)");
        assert_eq!(
            suggestion("exmaple", "config"),
            " (did you mean \"example\"?)"
        );
        assert_eq!(suggestion("frobnicate", ""), "");
        assert!(subcommands("ctl").contains(&"cancel"));
        assert!(subcommands("").contains(&"button"));
    }
}
