//! fake-agent: a stand-in for the Claude Code CLI in headless mode (`claude -p …`).
//!
//! walkie's integration tests and demo start it instead of `claude`: it accepts the real
//! CLI's flags, prints the same stream-json shapes (see `tests/fixtures/claude-cli/`), and
//! follows scenario directives written in the prompt (`@sleep=2`, `@fail`, `@stall`,
//! `@flood=50M`, `@grandchild`, … — README.md has the table). With `--input-format
//! stream-json` it keeps stdin open as the CLI does: user messages, steering, interrupts and
//! permission requests. It is independent of the walkie library on purpose: it models the
//! agent, not walkie's idea of it.
//!
//! One thread; stdout and the signal handling belong to [`run`] (one prompt in argv) or
//! [`duplex`] (messages on stdin). No unsafe code: signal handlers come from signal-hook.

#![deny(unsafe_code)]

mod cli;
mod directives;
mod duplex;
mod flood;
mod lines;
mod output;
mod run;
mod signals;
mod workspace;

use std::process::ExitCode;

fn main() -> ExitCode {
    let status = match cli::parse(std::env::args().skip(1)) {
        Err(e) => {
            eprintln!("{e}");
            1
        }
        Ok(cli::Mode::Help) => {
            print!("{}", cli::HELP);
            0
        }
        Ok(cli::Mode::Version) => {
            println!("{} (Claude Code)", lines::CLAUDE_CODE_VERSION);
            0
        }
        Ok(cli::Mode::SleepForever { setsid }) => run::sleep_forever(setsid),
        Ok(cli::Mode::Agent(options)) if options.input_stream_json => duplex::main(options),
        Ok(cli::Mode::Agent(options)) => run::main(options),
    };
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}
