//! Command-line parsing and dispatch (README.md). Exit codes: 0 ok, 1 runtime failure,
//! 2 usage or config error, 3 daemon not reachable.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::Config;
use crate::control::{Request, client};
use crate::paths::Paths;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

const USAGE: &str = "\
walkie — push-to-talk voice front end for coding agents

usage:
  walkie run [--config FILE] [--trace FILE]       the daemon, in the foreground
  walkie ctl status [--json]                       link, audio, button, task counts, uptime
  walkie ctl tasks [--json] [--raw]                the task registry
  walkie ctl start [--name NAME] [--project P] PROMPT...
  walkie ctl continue NAME PROMPT...               follow-up in the task's agent session
  walkie ctl cancel NAME                           stop a task and all its descendants
  walkie ctl interrupt NAME                        end the agent's current turn, keep its session
  walkie ctl approve NAME [--always] | deny NAME [REASON]   answer its permission request
  walkie ctl result NAME [--json] [--raw]          a finished task's summary and details
  walkie ctl logs NAME [--follow] [--raw]          a task's agent output
  walkie ctl events [--json]                       task events as they happen
  walkie ctl say TEXT...                           a typed user turn
  walkie ctl transcript [--json]                   the recent conversation
  walkie ctl press | release                       the push-to-talk button, from software
  walkie doctor [--config FILE]                    checks the setup, one line each
  walkie devices                                   ALSA PCMs and input devices
  walkie button learn [--device PATH]              find the key to use as the button
  walkie config check [FILE] | example | init      validate, print or write the configuration

`walkie COMMAND --help` says more about each command.
exit codes: 0 ok, 1 failure, 2 usage or configuration error, 3 daemon not reachable
";

/// A usage error: printed with a hint, exit code 2.
#[derive(Debug, PartialEq)]
struct Usage(String);

fn usage(msg: impl Into<String>) -> Usage {
    Usage(msg.into())
}

/// Runs the command line `args` (without the program name); returns the exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    crate::logging::init();
    let args: Vec<String> = match args.into_iter().map(|a| a.into_string()).collect() {
        Ok(a) => a,
        Err(bad) => {
            eprintln!("walkie: argument is not valid UTF-8: {bad:?}");
            return EXIT_USAGE;
        }
    };
    match dispatch(&args) {
        Ok(code) => code,
        Err(Usage(msg)) => {
            eprintln!("walkie: {msg}\nrun `walkie --help` for usage");
            EXIT_USAGE
        }
    }
}

fn dispatch(args: &[String]) -> Result<i32, Usage> {
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return Ok(EXIT_USAGE);
    };
    // `walkie X Y --help` (before any `--`) and `walkie help X Y`: the most specific topic.
    let asks_help = args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--help" || a == "-h");
    if asks_help || cmd == "help" {
        let words: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .filter(|a| !a.starts_with('-') && *a != "help")
            .collect();
        match crate::help::topic(&words) {
            Some(text) => println!("{text}"),
            None => print!("{USAGE}"),
        }
        return Ok(EXIT_OK);
    }
    match cmd.as_str() {
        "-V" | "--version" => {
            println!("walkie {}", env!("CARGO_PKG_VERSION"));
            Ok(EXIT_OK)
        }
        "run" => {
            let mut opts = Opts::parse(rest, &["--config", "--trace"], &[])?;
            opts.no_positionals()?;
            let config_path = opts.value("--config").map(PathBuf::from);
            let trace = opts.value("--trace").map(PathBuf::from);
            Ok(crate::daemon::run(config_path, trace))
        }
        "ctl" => ctl(rest),
        "config" => config_cmd(rest),
        "doctor" => {
            let mut opts = Opts::parse(rest, &["--config"], &[])?;
            opts.no_positionals()?;
            Ok(crate::doctor::doctor(
                opts.value("--config").map(PathBuf::from),
            ))
        }
        "devices" => {
            Opts::parse(rest, &[], &[])?.no_positionals()?;
            Ok(crate::devices::devices())
        }
        "button" => button_cmd(rest),
        other => Err(usage(format!(
            "unknown command \"{other}\"{}",
            crate::help::suggestion(other, "")
        ))),
    }
}

fn config_cmd(rest: &[String]) -> Result<i32, Usage> {
    match rest.split_first() {
        Some((sub, more)) if sub == "check" => {
            let opts = Opts::parse(more, &[], &[])?;
            if opts.positionals.len() > 1 {
                return Err(usage("config check takes at most one FILE"));
            }
            let paths = Paths::from_env();
            let source = Config::locate(
                opts.positionals.first().map(PathBuf::from).as_deref(),
                &paths,
            );
            match Config::load_source(&source) {
                Ok(_) => {
                    match source {
                        crate::config::ConfigSource::File(p) => println!("{}: ok", p.display()),
                        crate::config::ConfigSource::Defaults => {
                            println!(
                                "no configuration file ({}): the defaults are used",
                                paths.config_file.display()
                            )
                        }
                    }
                    Ok(EXIT_OK)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(EXIT_USAGE)
                }
            }
        }
        Some((sub, more)) if sub == "example" => {
            Opts::parse(more, &[], &[])?.no_positionals()?;
            print!("{}", crate::config::EXAMPLE);
            Ok(EXIT_OK)
        }
        Some((sub, more)) if sub == "init" => {
            let mut opts = Opts::parse(more, &["--config"], &[])?;
            opts.no_positionals()?;
            Ok(config_init(opts.value("--config").map(PathBuf::from)))
        }
        Some((sub, _)) => Err(usage(format!(
            "unknown config command \"{sub}\"{} (check, example, init)",
            crate::help::suggestion(sub, "config")
        ))),
        None => Err(usage("config needs a command: check, example or init")),
    }
}

fn ctl(rest: &[String]) -> Result<i32, Usage> {
    let Some((sub, more)) = rest.split_first() else {
        return Err(usage("ctl needs a command (status, tasks, start, …)"));
    };
    // `--raw`: agent and model text as it came, escape sequences included (see
    // client::visible), for the commands that print such text.
    let takes_raw = matches!(
        sub.as_str(),
        "status" | "tasks" | "transcript" | "events" | "result" | "logs"
    );
    let raw = takes_raw && more.iter().any(|a| a == "--raw");
    let more: Vec<String> = more
        .iter()
        .filter(|a| !(takes_raw && *a == "--raw"))
        .cloned()
        .collect();
    let more = more.as_slice();
    let words = |opts: &Opts, what: &str| -> Result<String, Usage> {
        let text = opts.positionals.join(" ");
        if text.trim().is_empty() {
            Err(usage(format!("ctl {sub} needs {what}")))
        } else {
            Ok(text)
        }
    };
    let one_name = |opts: &Opts| -> Result<String, Usage> {
        match opts.positionals.as_slice() {
            [name] => Ok(name.clone()),
            [] => Err(usage(format!("ctl {sub} needs a task NAME"))),
            _ => Err(usage(format!(
                "ctl {sub} takes one task NAME (quote a name with spaces)"
            ))),
        }
    };
    let (request, json) = match sub.as_str() {
        "status" | "tasks" | "transcript" | "events" => {
            let mut opts = Opts::parse(more, &[], &["--json"])?;
            opts.no_positionals()?;
            let req = match sub.as_str() {
                "status" => Request::Status,
                "tasks" => Request::Tasks,
                "events" => Request::Events,
                _ => Request::Transcript,
            };
            (req, opts.flag("--json"))
        }
        "start" => {
            let opts = Opts::parse(more, &["--name", "--project"], &[])?;
            let req = Request::Start {
                prompt: words(&opts, "a PROMPT")?,
                name: opts.value("--name").map(str::to_string),
                project: opts.value("--project").map(str::to_string),
            };
            (req, false)
        }
        "continue" => {
            let opts = Opts::parse(more, &[], &[])?;
            let Some((name, prompt)) = opts.positionals.split_first() else {
                return Err(usage("ctl continue needs NAME and PROMPT"));
            };
            let prompt = prompt.join(" ");
            if prompt.trim().is_empty() {
                return Err(usage("ctl continue needs a PROMPT after the NAME"));
            }
            (
                Request::Continue {
                    name: name.clone(),
                    prompt,
                },
                false,
            )
        }
        "cancel" => (
            Request::Cancel {
                name: one_name(&Opts::parse(more, &[], &[])?)?,
            },
            false,
        ),
        "interrupt" => (
            Request::Interrupt {
                name: one_name(&Opts::parse(more, &[], &[])?)?,
            },
            false,
        ),
        "approve" => {
            let opts = Opts::parse(more, &[], &["--always"])?;
            (
                Request::Approve {
                    name: one_name(&opts)?,
                    always: opts.flag("--always"),
                },
                false,
            )
        }
        "deny" => {
            let opts = Opts::parse(more, &[], &[])?;
            let Some((name, reason)) = opts.positionals.split_first() else {
                return Err(usage("ctl deny needs a task NAME"));
            };
            let reason = reason.join(" ");
            (
                Request::Deny {
                    name: name.clone(),
                    reason: Some(reason).filter(|r| !r.trim().is_empty()),
                },
                false,
            )
        }
        "result" => {
            let opts = Opts::parse(more, &[], &["--json"])?;
            (
                Request::Result {
                    name: one_name(&opts)?,
                },
                opts.flag("--json"),
            )
        }
        "logs" => {
            let opts = Opts::parse(more, &[], &["--follow", "-f"])?;
            let follow = opts.flag("--follow") || opts.flag("-f");
            (
                Request::Logs {
                    name: one_name(&opts)?,
                    follow,
                },
                false,
            )
        }
        "say" => (
            Request::Say {
                text: words(&Opts::parse(more, &[], &[])?, "TEXT")?,
            },
            false,
        ),
        "press" | "release" => {
            Opts::parse(more, &[], &[])?.no_positionals()?;
            (
                if sub == "press" {
                    Request::Press
                } else {
                    Request::Release
                },
                false,
            )
        }
        other => {
            return Err(usage(format!(
                "unknown ctl command \"{other}\"{}",
                crate::help::suggestion(other, "ctl")
            )));
        }
    };
    let socket = Paths::from_env().control_socket();
    Ok(client::run(&socket, &request, client::Format { json, raw }))
}

/// `walkie config init`: the example where walkie looks for its configuration, never over
/// an existing file. The directory is created (0700: the configuration may name key files).
fn config_init(explicit: Option<PathBuf>) -> i32 {
    let paths = Paths::from_env();
    let path = match Config::locate(explicit.as_deref(), &paths) {
        crate::config::ConfigSource::File(path) => path,
        crate::config::ConfigSource::Defaults => paths.config_file.clone(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            eprintln!("walkie: cannot create {}: {e}", dir.display());
            return EXIT_FAILURE;
        }
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path);
    match file {
        Ok(mut file) => {
            use std::io::Write;
            if let Err(e) = file.write_all(crate::config::EXAMPLE.as_bytes()) {
                eprintln!("walkie: cannot write {}: {e}", path.display());
                return EXIT_FAILURE;
            }
            println!(
                "wrote {}: every key at its default; edit what you need, then `walkie doctor`",
                path.display()
            );
            EXIT_OK
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            eprintln!(
                "walkie: {} already exists; it was left as it is (`walkie config example` prints the defaults)",
                path.display()
            );
            EXIT_FAILURE
        }
        Err(e) => {
            eprintln!("walkie: cannot write {}: {e}", path.display());
            EXIT_FAILURE
        }
    }
}

/// `walkie button learn`.
fn button_cmd(rest: &[String]) -> Result<i32, Usage> {
    match rest.split_first() {
        Some((sub, more)) if sub == "learn" => {
            let mut opts = Opts::parse(more, &["--device", "--timeout", "--dir"], &[])?;
            opts.no_positionals()?;
            let timeout = match opts.value("--timeout") {
                None => 60,
                Some(v) => v
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (1..=3600).contains(s))
                    .ok_or_else(|| usage("--timeout takes seconds, 1..3600"))?,
            };
            let device = opts.value("--device").map(PathBuf::from);
            // --dir: another /dev/input (tests).
            let dir = PathBuf::from(opts.value("--dir").unwrap_or("/dev/input"));
            let config_file = Paths::from_env().config_file;
            let result = crate::button::learn::learn(
                device.as_deref(),
                &dir,
                std::time::Duration::from_secs(timeout),
                |n, failures| {
                    for failure in failures {
                        eprintln!("walkie: cannot read {failure}");
                    }
                    eprintln!(
                        "press the key you want to use ({n} device(s) listening; Ctrl-C to stop)…"
                    );
                },
            );
            match result {
                Ok(learned) => {
                    print!("{}", crate::button::learn::report(&learned, &config_file));
                    Ok(EXIT_OK)
                }
                Err(e) => {
                    eprintln!("walkie: {e}");
                    if matches!(e, crate::button::learn::LearnError::NothingReadable(_)) {
                        eprintln!(
                            "reading /dev/input needs the input group: sudo usermod -aG input $USER, then log out and in again"
                        );
                    }
                    Ok(EXIT_FAILURE)
                }
            }
        }
        Some((sub, _)) => Err(usage(format!(
            "unknown button command \"{sub}\"{} (learn)",
            crate::help::suggestion(sub, "button")
        ))),
        None => Err(usage("button needs a command: learn")),
    }
}

/// Options (`--key VALUE`, `--key=VALUE`, flags) and positionals; `--` ends options.
#[derive(Debug, Default)]
struct Opts {
    values: Vec<(String, String)>,
    flags: Vec<String>,
    positionals: Vec<String>,
}

impl Opts {
    fn parse(args: &[String], with_value: &[&str], flags: &[&str]) -> Result<Opts, Usage> {
        let mut opts = Opts::default();
        let mut it = args.iter();
        let mut only_positionals = false;
        while let Some(arg) = it.next() {
            if only_positionals || !arg.starts_with('-') || arg == "-" {
                opts.positionals.push(arg.clone());
                continue;
            }
            if arg == "--" {
                only_positionals = true;
                continue;
            }
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            if with_value.contains(&key) {
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| usage(format!("{key} needs a value")))?,
                };
                opts.values.push((key.to_string(), value));
            } else if flags.contains(&key) && inline.is_none() {
                opts.flags.push(key.to_string());
            } else {
                return Err(usage(format!("unknown option \"{arg}\"")));
            }
        }
        Ok(opts)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        self.flags.iter().any(|f| f == key)
    }

    fn no_positionals(&mut self) -> Result<(), Usage> {
        match self.positionals.first() {
            Some(p) => Err(usage(format!("unexpected argument \"{p}\""))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_values_flags_and_positionals() {
        let o = Opts::parse(
            &v(&["--name", "x", "fix", "--", "--not-an-option"]),
            &["--name"],
            &[],
        )
        .unwrap();
        assert_eq!(o.value("--name"), Some("x"));
        assert_eq!(o.positionals, v(&["fix", "--not-an-option"]));
        let o = Opts::parse(&v(&["--project=web", "a"]), &["--project"], &[]).unwrap();
        assert_eq!(o.value("--project"), Some("web"));
        assert!(
            Opts::parse(&v(&["--bogus"]), &[], &[])
                .unwrap_err()
                .0
                .contains("--bogus")
        );
        assert!(
            Opts::parse(&v(&["--name"]), &["--name"], &[])
                .unwrap_err()
                .0
                .contains("needs a value")
        );
        assert!(Opts::parse(&v(&["--json=1"]), &[], &["--json"]).is_err());
    }

    #[test]
    fn usage_errors_exit_2() {
        assert_eq!(main(vec!["frobnicate".into()]), EXIT_USAGE);
        assert_eq!(main(vec!["ctl".into(), "start".into()]), EXIT_USAGE);
        assert_eq!(
            main(vec!["ctl".into(), "cancel".into(), "a".into(), "b".into()]),
            EXIT_USAGE
        );
        assert_eq!(main(vec!["run".into(), "extra".into()]), EXIT_USAGE);
        assert_eq!(main(vec!["--version".into()]), EXIT_OK);
    }
}
