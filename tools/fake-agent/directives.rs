//! Scenario directives: `@name` / `@name=value` tokens in the prompt (no IO).
//!
//! Each task of one walkie gets its own prompt, so putting the scenario in the prompt lets one
//! test run tasks that behave differently; `FAKE_AGENT_DIRECTIVES` adds directives to every
//! run of an environment. Only known names are directives: any other `@word` stays prompt text.

use std::path::PathBuf;
use std::time::Duration;

/// A directive that cannot be carried out as written.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DirectiveError {
    /// A directive that needs `=value` came without one; the caller exits with usage status.
    #[error("directive @{0} needs a value (@{0}=...)")]
    NeedsValue(String),
    /// A flag directive was given a value; the caller exits with usage status.
    #[error("directive @{0} takes no value")]
    TakesNoValue(String),
    /// The value does not parse for this directive; the caller exits with usage status.
    #[error("directive @{name}: bad value {value:?} ({why})")]
    Invalid {
        name: String,
        value: String,
        why: &'static str,
    },
}

/// A tool use the scenario performs, in prompt order.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolDirective {
    /// `@write=PATH`: a Write that creates or overwrites PATH (relative to the cwd).
    Write(PathBuf),
    /// `@edit=PATH`: an Edit of PATH (preceded by a Write when PATH is missing or empty).
    Edit(PathBuf),
    /// `@bash=CMD`: a Bash tool use that is reported but not run.
    Bash(String),
    /// `@grandchild`: a Bash tool use that really starts a sleeper in its own session.
    Grandchild,
    /// `@ask=CMD`: a Bash tool use that needs the user's approval (reported, not run).
    Ask(String),
    /// `@ask-write=PATH`: a Write outside the project, which asks even under acceptEdits.
    AskWrite(PathBuf),
}

/// Everything the prompt and the environment asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Directives {
    pub sleep: Option<Duration>,
    pub tools: Vec<ToolDirective>,
    /// `@fail[=STATUS]`: the API keeps answering STATUS (401 when not given).
    pub fail: Option<u16>,
    pub max_turns: bool,
    pub exit: Option<i32>,
    pub stall: bool,
    pub flood: Option<u64>,
    /// Bytes per second.
    pub flood_rate: Option<u64>,
    pub ignore_term: bool,
    pub ignore_int: bool,
    pub env: bool,
    pub malformed: bool,
    pub oversize: Option<u64>,
    pub plain: bool,
    pub secret: bool,
    pub text: Option<String>,
    /// `@say=FILE`: assistant messages, one JSON string per line of FILE (relative to the cwd).
    pub say: Option<PathBuf>,
    /// `@garbage=SIZE`: SIZE random bytes instead of any stream-json, then exit.
    pub garbage: Option<u64>,
    pub stderr: Option<String>,
    pub pidfile: Option<PathBuf>,
    /// `@tool-ms=MS`: every tool use of the message runs this long before its result.
    pub tool_time: Option<Duration>,
    /// `@withdraw=MS`: a permission request unanswered this long is withdrawn.
    pub withdraw: Option<Duration>,
    /// `@control=SUBTYPE`: a control request of this subtype, sent at the start of the turn.
    pub control: Option<String>,
}

/// The prompt split into directives and the words meant for the "model".
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub directives: Directives,
    /// The prompt without its directive tokens, whitespace collapsed to single spaces.
    pub prompt: String,
}

impl Directives {
    /// Whether the run does something of its own, so the default notes file is not written.
    pub fn has_own_content(&self) -> bool {
        !self.tools.is_empty()
            || self.flood.is_some()
            || self.flood_rate.is_some()
            || self.oversize.is_some()
            || self.env
            || self.stall
            || self.say.is_some()
    }
}

/// Splits `prompt` into directives and text, then adds the directives of `from_env`
/// (the value of `FAKE_AGENT_DIRECTIVES`, whose non-directive words are ignored).
pub fn parse(prompt: &str, from_env: Option<&str>) -> Result<Parsed, DirectiveError> {
    let mut directives = Directives::default();
    let mut words = Vec::new();
    for token in prompt.split_whitespace() {
        if !apply(&mut directives, token)? {
            words.push(token);
        }
    }
    for token in from_env.unwrap_or("").split_whitespace() {
        apply(&mut directives, token)?;
    }
    Ok(Parsed {
        directives,
        prompt: words.join(" "),
    })
}

/// Applies `token` if it is a directive; `Ok(false)` when it is ordinary prompt text.
fn apply(d: &mut Directives, token: &str) -> Result<bool, DirectiveError> {
    let Some(body) = token.strip_prefix('@') else {
        return Ok(false);
    };
    let (name, value) = match body.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (body, None),
    };
    let need = || {
        value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| DirectiveError::NeedsValue(name.to_owned()))
    };
    let flag = || match value {
        None => Ok(true),
        Some(_) => Err(DirectiveError::TakesNoValue(name.to_owned())),
    };
    let bad = |value: &str, why| DirectiveError::Invalid {
        name: name.to_owned(),
        value: value.to_owned(),
        why,
    };
    match name {
        "sleep" => {
            let v = need()?;
            let secs: f64 = v.parse().map_err(|_| bad(v, "seconds, e.g. 1.5"))?;
            d.sleep = Some(Duration::try_from_secs_f64(secs).map_err(|_| bad(v, "seconds >= 0"))?);
        }
        "write" => d.tools.push(ToolDirective::Write(need()?.into())),
        "edit" => d.tools.push(ToolDirective::Edit(need()?.into())),
        "bash" => d.tools.push(ToolDirective::Bash(spaced(need()?))),
        "grandchild" => {
            flag()?;
            d.tools.push(ToolDirective::Grandchild);
        }
        "ask" => d.tools.push(ToolDirective::Ask(spaced(need()?))),
        "ask-write" => d.tools.push(ToolDirective::AskWrite(need()?.into())),
        "tool-ms" => {
            let v = need()?;
            let ms: u64 = v.parse().map_err(|_| bad(v, "milliseconds, e.g. 1500"))?;
            d.tool_time = Some(Duration::from_millis(ms));
        }
        "withdraw" => {
            let v = need()?;
            let ms: u64 = v.parse().map_err(|_| bad(v, "milliseconds, e.g. 500"))?;
            d.withdraw = Some(Duration::from_millis(ms));
        }
        "control" => d.control = Some(need()?.to_owned()),
        "fail" => {
            d.fail = Some(match value {
                None => 401,
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|s| (400..600).contains(s))
                    .ok_or_else(|| bad(v, "an HTTP error status 400..599"))?,
            });
        }
        "maxturns" => d.max_turns = flag()?,
        "exit" => {
            let v = need()?;
            d.exit = Some(
                v.parse()
                    .ok()
                    .filter(|c| (0..=255).contains(c))
                    .ok_or_else(|| bad(v, "an exit code 0..255"))?,
            );
        }
        "stall" => d.stall = flag()?,
        "flood" => {
            let v = need()?;
            d.flood = Some(parse_size(v).ok_or_else(|| bad(v, "a size like 1000, 512K, 50M"))?);
        }
        "flood-rate" => {
            let v = need()?;
            d.flood_rate = Some(
                parse_size(v)
                    .filter(|r| *r > 0)
                    .ok_or_else(|| bad(v, "bytes per second like 5M"))?,
            );
        }
        "ignore-term" => d.ignore_term = flag()?,
        "ignore-int" => d.ignore_int = flag()?,
        "env" => d.env = flag()?,
        "malformed" => d.malformed = flag()?,
        "oversize" => {
            let v = need()?;
            d.oversize = Some(parse_size(v).ok_or_else(|| bad(v, "a size like 2M"))?);
        }
        "plain" => d.plain = flag()?,
        "secret" => d.secret = flag()?,
        "text" => d.text = Some(spaced(need()?)),
        "say" => d.say = Some(need()?.into()),
        "garbage" => {
            let v = need()?;
            d.garbage = Some(parse_size(v).ok_or_else(|| bad(v, "a size like 64K"))?);
        }
        "stderr" => d.stderr = Some(spaced(need()?)),
        "pidfile" => d.pidfile = Some(need()?.into()),
        _ => return Ok(false),
    }
    Ok(true)
}

/// Prompt tokens cannot hold spaces, so text values spell them as underscores.
fn spaced(value: &str) -> String {
    value.replace('_', " ")
}

/// `1000`, `512K`, `50M`, `1G` (binary multiples; a trailing `B` or `iB` is accepted).
pub fn parse_size(text: &str) -> Option<u64> {
    let upper = text.to_ascii_uppercase();
    let trimmed = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, multiplier) = match trimmed.chars().last()? {
        'K' => (&trimmed[..trimmed.len() - 1], 1u64 << 10),
        'M' => (&trimmed[..trimmed.len() - 1], 1 << 20),
        'G' => (&trimmed[..trimmed.len() - 1], 1 << 30),
        _ => (trimmed, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_directive_leaves_the_prompt_alone() {
        let p = parse("fix the  flaky\ttest", None).unwrap();
        assert_eq!(p.directives, Directives::default());
        assert_eq!(p.prompt, "fix the flaky test");
        assert!(!p.directives.has_own_content());
    }

    #[test]
    fn directives_anywhere_are_taken_out() {
        let p = parse("@sleep=1.5 fix @fail it @exit=3", None).unwrap();
        assert_eq!(p.prompt, "fix it");
        assert_eq!(p.directives.sleep, Some(Duration::from_millis(1500)));
        assert_eq!(p.directives.fail, Some(401));
        assert_eq!(p.directives.exit, Some(3));
    }

    #[test]
    fn unknown_at_words_stay_in_the_prompt() {
        let p = parse("ask @alice about @sleepy", None).unwrap();
        assert_eq!(p.prompt, "ask @alice about @sleepy");
        assert_eq!(p.directives, Directives::default());
    }

    #[test]
    fn tool_directives_repeat_in_order() {
        let p = parse(
            "@write=a.md @bash=cargo_test @edit=b.rs @grandchild @write=c",
            None,
        )
        .unwrap();
        assert_eq!(
            p.directives.tools,
            [
                ToolDirective::Write("a.md".into()),
                ToolDirective::Bash("cargo test".into()),
                ToolDirective::Edit("b.rs".into()),
                ToolDirective::Grandchild,
                ToolDirective::Write("c".into()),
            ]
        );
        assert!(p.directives.has_own_content());
    }

    #[test]
    fn environment_directives_are_added() {
        let p = parse("hello @write=x", Some("@sleep=1 @fail=529 stray words")).unwrap();
        assert_eq!(p.prompt, "hello");
        assert_eq!(p.directives.sleep, Some(Duration::from_secs(1)));
        assert_eq!(p.directives.fail, Some(529));
        assert_eq!(p.directives.tools.len(), 1);
    }

    #[test]
    fn flags_and_values() {
        let p = parse(
            "@stall @ignore-term @ignore-int @env @malformed @plain @secret @maxturns \
             @flood=50M @flood-rate=5M @oversize=2K @text=all_good @stderr=oh_no @pidfile=p \
             @say=lines.jsonl @garbage=4K",
            None,
        )
        .unwrap();
        let d = p.directives;
        assert!(d.stall && d.ignore_term && d.ignore_int && d.env && d.malformed);
        assert!(d.plain && d.secret && d.max_turns);
        assert_eq!(d.flood, Some(50 << 20));
        assert_eq!(d.flood_rate, Some(5 << 20));
        assert_eq!(d.oversize, Some(2048));
        assert_eq!(d.text.as_deref(), Some("all good"));
        assert_eq!(d.stderr.as_deref(), Some("oh no"));
        assert_eq!(d.pidfile, Some(PathBuf::from("p")));
        assert_eq!(d.say, Some(PathBuf::from("lines.jsonl")));
        assert_eq!(d.garbage, Some(4096));
        assert_eq!(p.prompt, "");
    }

    #[test]
    fn permission_and_timing_directives() {
        let p = parse(
            "do it @ask=npm_test @tool-ms=1500 @ask-write=/tmp/out.txt @withdraw=200 \
             @control=hook_callback",
            None,
        )
        .unwrap();
        assert_eq!(p.prompt, "do it");
        let d = p.directives;
        assert_eq!(
            d.tools,
            [
                ToolDirective::Ask("npm test".into()),
                ToolDirective::AskWrite("/tmp/out.txt".into())
            ]
        );
        assert_eq!(d.tool_time, Some(Duration::from_millis(1500)));
        assert_eq!(d.withdraw, Some(Duration::from_millis(200)));
        assert_eq!(d.control.as_deref(), Some("hook_callback"));
        assert!(d.has_own_content());
        assert!(matches!(
            parse("@tool-ms=soon", None),
            Err(DirectiveError::Invalid { .. })
        ));
        assert_eq!(
            parse("@ask", None),
            Err(DirectiveError::NeedsValue("ask".into()))
        );
    }

    #[test]
    fn bad_directives_are_reported() {
        assert_eq!(
            parse("@sleep", None),
            Err(DirectiveError::NeedsValue("sleep".into()))
        );
        assert_eq!(
            parse("@stall=yes", None),
            Err(DirectiveError::TakesNoValue("stall".into()))
        );
        assert!(matches!(
            parse("@sleep=-1", None),
            Err(DirectiveError::Invalid { .. })
        ));
        assert!(matches!(
            parse("@flood=lots", None),
            Err(DirectiveError::Invalid { .. })
        ));
        assert!(matches!(
            parse("@fail=200", None),
            Err(DirectiveError::Invalid { .. })
        ));
        assert!(matches!(
            parse("x", Some("@exit=300")),
            Err(DirectiveError::Invalid { .. })
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("512K"), Some(512 * 1024));
        assert_eq!(parse_size("512k"), Some(512 * 1024));
        assert_eq!(parse_size("50M"), Some(50 * 1024 * 1024));
        assert_eq!(parse_size("5MB"), Some(5 * 1024 * 1024));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("1.5M"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }
}
