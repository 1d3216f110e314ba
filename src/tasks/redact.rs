//! Secrets out of anything walkie speaks or sends to the Realtime model (task summaries,
//! results, failure reasons), and the text made speakable. Pure functions, no fd, no
//! thread; the regexes are compiled once, on first use, and shared.
//!
//! The patterns aim at what coding agents actually print: provider API keys of known shape,
//! bearer headers, PEM private keys, passwords in URLs and `.env`/JSON/YAML assignments to
//! names that say "secret". Ordinary prose, paths and git output (40-hex commit ids,
//! `Author:` lines) must survive, so every generic pattern has a near-miss test.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::{Captures, Regex};

pub const REDACTED: &str = "[redacted]";

/// PEM private key blocks, including one cut off before its END line.
static PEM_PRIVATE_KEY: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r"(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\z)",
    )
});

/// `scheme://user:password@host`; the user may be empty (`redis://:pw@host`). The password
/// runs to the last '@' before the path, so an unescaped '@' in it does not leak the rest.
static URL_PASSWORD: LazyLock<Regex> =
    LazyLock::new(|| compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)([^\s:/@?#\[\]]*):([^\s/?#]+)@"));

/// `curl -u user:password` / `--user user:password` (in the same command); the user is kept.
static CURL_USER: LazyLock<Regex> = LazyLock::new(|| {
    compile(r#"(\bcurl\b[^\n|;&]*?\s(?:-u|--user)(?:[ \t]+|=)["']?[^\s:"']+:)([^\s"']+)"#)
});

/// `Authorization: Bearer …` headers (also JSON and `=` forms); the scheme word is kept.
static AUTHORIZATION_HEADER: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r#"(?i)\b((?:proxy-)?authorization["']?[ \t]*[:=][ \t]*["']?)((?:bearer|basic|token|digest|negotiate|bot)[ \t]+)?([^\s"',;]+)"#,
    )
});

/// A bare `Bearer <token>`; the token must look like one (see [`redact_bearer`]).
static BEARER: LazyLock<Regex> =
    LazyLock::new(|| compile(r"(?i)\b(bearer[ \t]+)([A-Za-z0-9\-._~+/]+=*)"));

/// Tokens recognisable by their own shape, wherever they appear.
static TOKEN_PATTERNS: LazyLock<Vec<TokenPattern>> = LazyLock::new(|| {
    [
        // Anthropic before OpenAI: both start with "sk-".
        (r"\bsk-ant-[A-Za-z0-9_\-]{20,}", true),
        (r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}", true),
        (r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", false),
        (r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b", false),
        (r"\bgithub_pat_[A-Za-z0-9_]{30,}", false),
        (r"\bglpat-[A-Za-z0-9_\-]{20,}", true),
        (r"\bxox[abprs]-[A-Za-z0-9\-]{10,}", true),
        (r"\bAIza[0-9A-Za-z_\-]{35}", false),
        (r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}", false),
        (r"\bhf_[A-Za-z0-9]{30,}", true),
        (
            r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",
            false,
        ),
    ]
    .into_iter()
    .map(|(pattern, needs_digit)| TokenPattern {
        regex: compile(pattern),
        needs_digit,
    })
    .collect()
});

/// Names that may say "secret" (checked by [`is_secret_name`]) and the separator with the
/// closing quote of a JSON key.
/// A name starts after a character that cannot be part of it, nor a '/': `src/auth.rs:42`
/// is a path, not an assignment.
const SECRET_NAME: &str = r#"(?i)(?P<pre>^|[^A-Za-z0-9_.\-/])(?P<name>[A-Za-z0-9_.\-]*(?:secret|token|passw(?:or)?d|pwd|api[_\-]?key|access[_\-]?key|private[_\-]?key|credential|auth)[A-Za-z0-9_.\-]*)"#;
const QUOTED_VALUE: &str = r#""(?:[^"\\\n]|\\.)*"|'[^'\n]*'"#;

/// `NAME=value`, `export NAME="value"`, `name = "value"` (TOML, Python): a shell-style value
/// ends at whitespace.
static ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    compile(&format!(
        r#"{SECRET_NAME}(?P<sep>["']?[ \t]*=[ \t]*)(?P<value>{QUOTED_VALUE}|[^\s"'`,;}}\]]+)"#
    ))
});

/// `NAME: value` (YAML, prose, JSON `"name": "value"`): an unquoted value may hold spaces
/// and runs to the end of the line or the next `,` `;` `}`.
static COLON_ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    compile(&format!(
        r#"{SECRET_NAME}(?P<sep>["']?[ \t]*:[ \t]*)(?P<value>{QUOTED_VALUE}|[^\s"'`,;}}\]]+(?:[ \t]+[^\s"'`,;}}\]]+)*)"#
    ))
});

/// A key of a known shape. `needs_digit`: the prefix alone is a plausible word
/// (`sk-some-long-kebab-name`), so the rest must contain a digit to count as a key.
struct TokenPattern {
    regex: Regex,
    needs_digit: bool,
}

/// The patterns are literals checked by the tests; failing to compile one is a bug.
fn compile(pattern: &str) -> Regex {
    match Regex::new(pattern) {
        Ok(regex) => regex,
        Err(error) => panic!("redaction pattern {pattern:?}: {error}"),
    }
}

/// Compiles every pattern now. The daemon calls this at start so the first tool call or
/// summary on the loop does not pay for regex compilation (tens of ms in a debug build).
pub fn warm_up() {
    let _ = speech_summary(
        "warm up: Bearer abc sk-proj-0123456789abcdefghij https://u:p@h DB_PASSWORD=x",
        80,
    );
}

/// `text` with every recognised secret replaced by [`REDACTED`]; labels around it (header
/// names, variable names, URL user and host, quotes) are kept so the text still reads.
pub fn redact(text: &str) -> String {
    let mut text = Cow::Borrowed(text);
    replace(&mut text, &PEM_PRIVATE_KEY, |_| REDACTED.to_owned());
    replace(&mut text, &URL_PASSWORD, |caps| {
        format!("{}{}:{REDACTED}@", &caps[1], &caps[2])
    });
    replace(&mut text, &CURL_USER, |caps| {
        format!("{}{REDACTED}", &caps[1])
    });
    replace(&mut text, &AUTHORIZATION_HEADER, |caps| {
        let scheme = caps.get(2).map_or("", |m| m.as_str());
        format!("{}{scheme}{REDACTED}", &caps[1])
    });
    replace(&mut text, &BEARER, redact_bearer);
    for pattern in TOKEN_PATTERNS.iter() {
        replace(&mut text, &pattern.regex, |caps| {
            let token = &caps[0];
            if pattern.needs_digit && !token.bytes().any(|b| b.is_ascii_digit()) {
                token.to_owned()
            } else {
                REDACTED.to_owned()
            }
        });
    }
    replace(&mut text, &ASSIGNMENT, redact_assignment);
    replace(&mut text, &COLON_ASSIGNMENT, redact_assignment);
    text.into_owned()
}

fn replace(text: &mut Cow<'_, str>, regex: &Regex, rep: impl FnMut(&Captures) -> String) {
    if let Cow::Owned(replaced) = regex.replace_all(text, rep) {
        *text = Cow::Owned(replaced);
    }
}

/// "the bearer of bad news" is prose; a token is long and has a digit somewhere.
fn redact_bearer(caps: &Captures) -> String {
    let token = &caps[2];
    if token.len() >= 16 && token.bytes().any(|b| b.is_ascii_digit()) {
        format!("{}{REDACTED}", &caps[1])
    } else {
        caps[0].to_owned()
    }
}

fn redact_assignment(caps: &Captures) -> String {
    let name = caps["name"].to_ascii_uppercase();
    let value = &caps["value"];
    let unquoted = value.trim_matches(|c| c == '"' || c == '\'');
    let keep = !is_secret_name(&name)
        // `auth.rs:42:5` is a compiler location.
        || (name.contains('.') && caps["sep"].contains(':') && value.starts_with(|c: char| c.is_ascii_digit()))
        // The header pass already kept the scheme word and redacted the credential.
        || name.ends_with("AUTHORIZATION")
        || unquoted.is_empty()
        // Already done by an earlier pass (the value pattern stops before its ']').
        || unquoted.starts_with("[redacted")
        // `token == other` is a comparison, `'token' => …` a PHP array arrow.
        || value.starts_with(['=', '>'])
        || ["true", "false", "null", "none", "nil"]
            .iter()
            .any(|word| unquoted.eq_ignore_ascii_case(word))
        // Token counts (`"input_tokens": 100`, `max_tokens: 4096`) are not tokens.
        || ((name.contains("TOKENS") || name.contains("MAX_TOKEN"))
            && unquoted.bytes().all(|b| b.is_ascii_digit()));
    if keep {
        return caps[0].to_owned();
    }
    let quote = match value.chars().next() {
        Some(q @ ('"' | '\'')) => q.to_string(),
        _ => String::new(),
    };
    format!(
        "{}{}{}{quote}{REDACTED}{quote}",
        &caps["pre"], &caps["name"], &caps["sep"]
    )
}

/// Does an (uppercased) variable or key name say it holds a secret?
fn is_secret_name(name: &str) -> bool {
    const WORDS: [&str; 12] = [
        "SECRET",
        "TOKEN",
        "PASSWORD",
        "PASSWD",
        "API_KEY",
        "API-KEY",
        "APIKEY",
        "ACCESS_KEY",
        "ACCESS-KEY",
        "ACCESSKEY",
        "PRIVATE_KEY",
        "CREDENTIAL",
    ];
    if WORDS.iter().any(|word| name.contains(word)) || name.contains("PRIVATEKEY") {
        return true;
    }
    // PWD and OLDPWD are the shell's working directories, not passwords.
    if name.contains("PWD") && name != "PWD" && name != "OLDPWD" {
        return true;
    }
    // AUTH, OAUTH, AUTH_TOKEN, AUTHORIZATION, but not AUTHOR(S) (git log) or AUTHORITY.
    name.match_indices("AUTH").any(|(at, _)| {
        let after = &name[at + 4..];
        !after.starts_with("OR") || after.starts_with("ORIZ")
    })
}

/// redact + make it speakable: strip markdown (code fences → "(code omitted)", headings,
/// bullets, emphasis, links → their text, inline code ticks), collapse whitespace, cut at a
/// sentence or word boundary so the result is ≤ max_chars (append "…" when cut).
pub fn speech_summary(text: &str, max_chars: usize) -> String {
    let plain = strip_markdown(&redact(text));
    // Stripping markup can join what it separated; one more pass costs little.
    cut(&redact(&plain), max_chars)
}

const CODE_OMITTED: &str = "(code omitted)";

static IMAGE: LazyLock<Regex> = LazyLock::new(|| compile(r"!\[([^\]]*)\]\([^)]*\)"));
static LINK: LazyLock<Regex> = LazyLock::new(|| compile(r"\[([^\]]+)\](?:\([^)]*\)|\[[^\]]*\])"));
static AUTOLINK: LazyLock<Regex> = LazyLock::new(|| compile(r"<((?:https?|mailto):[^>\s]+)>"));
static INLINE_CODE: LazyLock<Regex> = LazyLock::new(|| compile(r"`+([^`]+?)`+"));
static STRONG: LazyLock<Regex> = LazyLock::new(|| compile(r"\*\*\*?([^*]+?)\*\*\*?"));
static STRONG_UNDERSCORE: LazyLock<Regex> =
    LazyLock::new(|| compile(r"(^|[^A-Za-z0-9_])__([^_]+?)__($|[^A-Za-z0-9_])"));
/// `*word*` only at word edges: `2*3*4` is arithmetic, not emphasis.
static EMPHASIS: LazyLock<Regex> =
    LazyLock::new(|| compile(r"(^|[^A-Za-z0-9*])\*([^*\s][^*]*?)\*($|[^A-Za-z0-9*])"));
/// `_word_` only at word edges: snake_case identifiers keep their underscores.
static EMPHASIS_UNDERSCORE: LazyLock<Regex> =
    LazyLock::new(|| compile(r"(^|[^A-Za-z0-9_])_([^_\s][^_]*?)_($|[^A-Za-z0-9_])"));
static STRIKE: LazyLock<Regex> = LazyLock::new(|| compile(r"~~([^~]+)~~"));
static LIST_MARKER: LazyLock<Regex> = LazyLock::new(|| compile(r"^(?:[-*+]|\d{1,3}[.)])\s+"));
static TASK_BOX: LazyLock<Regex> = LazyLock::new(|| compile(r"^\[[ xX]\]\s+"));

/// Markdown to prose: each heading, list item, table row and paragraph becomes one
/// sentence (a period is added where it has none), code blocks become "(code omitted)".
fn strip_markdown(text: &str) -> String {
    let mut blocks: Vec<String> = Vec::new();
    let mut paragraph = String::new();
    let mut fence: Option<&str> = None;
    let mut paragraph_quoted = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(marker) = fence {
            if trimmed.starts_with(marker) && trimmed[marker.len()..].trim().is_empty() {
                fence = None;
            }
            continue;
        }
        if let Some(marker) = fence_marker(trimmed) {
            flush(&mut paragraph, &mut blocks);
            if blocks.last().map(String::as_str) != Some(CODE_OMITTED) {
                blocks.push(CODE_OMITTED.to_owned());
            }
            fence = Some(marker);
            continue;
        }
        let mut content = trimmed;
        let quoted = content.starts_with('>');
        while let Some(rest) = content.strip_prefix('>') {
            content = rest.trim_start();
        }
        if quoted != paragraph_quoted {
            // A quote starts or ends a block of its own.
            flush(&mut paragraph, &mut blocks);
            paragraph_quoted = quoted;
        }
        if content.is_empty() || is_rule(content) {
            flush(&mut paragraph, &mut blocks);
            continue;
        }
        if let Some(heading) = heading_text(content) {
            flush(&mut paragraph, &mut blocks);
            if !heading.is_empty() {
                blocks.push(heading.to_owned());
            }
            continue;
        }
        if content.starts_with('|') {
            flush(&mut paragraph, &mut blocks);
            let cells: Vec<&str> = content
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .filter(|cell| !cell.is_empty())
                .collect();
            let separator = cells
                .iter()
                .all(|cell| cell.chars().all(|c| matches!(c, '-' | ':')));
            if !separator {
                blocks.push(cells.join(", "));
            }
            continue;
        }
        if let Some(marker) = LIST_MARKER.find(content) {
            // A list item is its own sentence; its continuation lines join it.
            flush(&mut paragraph, &mut blocks);
            content = &content[marker.end()..];
            if let Some(task_box) = TASK_BOX.find(content) {
                content = &content[task_box.end()..];
            }
        }
        if !paragraph.is_empty() {
            paragraph.push(' ');
        }
        paragraph.push_str(content);
    }
    flush(&mut paragraph, &mut blocks);

    let mut out = String::with_capacity(text.len());
    for block in &blocks {
        let inline = strip_inline(block);
        let sentence = inline.split_whitespace().collect::<Vec<_>>().join(" ");
        if sentence.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&sentence);
        if !sentence.ends_with(['.', '!', '?', ':', ';', '…']) {
            out.push('.');
        }
    }
    out
}

fn flush(paragraph: &mut String, blocks: &mut Vec<String>) {
    if !paragraph.is_empty() {
        blocks.push(std::mem::take(paragraph));
    }
}

/// "```rust" opens a fence closed by "```" (or more); "~~~" likewise.
fn fence_marker(line: &str) -> Option<&'static str> {
    if line.starts_with("```") {
        Some("```")
    } else if line.starts_with("~~~") {
        Some("~~~")
    } else {
        None
    }
}

/// `---`, `***`, `___` (spaces allowed) on a line of their own.
fn is_rule(line: &str) -> bool {
    let mut chars = line.chars().filter(|c| !c.is_whitespace());
    match chars.next() {
        Some(first @ ('-' | '*' | '_')) => {
            let mut count = 1;
            for c in chars {
                if c != first {
                    return false;
                }
                count += 1;
            }
            count >= 3
        }
        _ => false,
    }
}

/// The text of an ATX heading (`## Title ##`), or None when the line is not one.
fn heading_text(line: &str) -> Option<&str> {
    let hashes = line.bytes().take_while(|&b| b == b'#').count();
    if hashes == 0 || hashes > 6 {
        return None;
    }
    let rest = &line[hashes..];
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return None; // "#hashtag", "#1"
    }
    Some(rest.trim().trim_end_matches('#').trim_end())
}

fn strip_inline(text: &str) -> String {
    let mut text = Cow::Borrowed(text);
    replace(&mut text, &IMAGE, |caps| caps[1].to_owned());
    replace(&mut text, &LINK, |caps| caps[1].to_owned());
    replace(&mut text, &AUTOLINK, |caps| caps[1].to_owned());
    replace(&mut text, &INLINE_CODE, |caps| caps[1].trim().to_owned());
    replace(&mut text, &STRONG, |caps| caps[1].to_owned());
    replace(&mut text, &STRONG_UNDERSCORE, |caps| {
        format!("{}{}{}", &caps[1], &caps[2], &caps[3])
    });
    replace(&mut text, &EMPHASIS, |caps| {
        format!("{}{}{}", &caps[1], &caps[2], &caps[3])
    });
    replace(&mut text, &EMPHASIS_UNDERSCORE, |caps| {
        format!("{}{}{}", &caps[1], &caps[2], &caps[3])
    });
    replace(&mut text, &STRIKE, |caps| caps[1].to_owned());
    text.into_owned()
}

/// At most `max` chars: whole when it fits; else up to the last sentence end (if that keeps
/// at least half) followed by " …", else up to the last word followed by "…".
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    if max == 0 {
        return String::new();
    }
    // Byte offset after the first max-1 chars: room for the ellipsis.
    let limit = text
        .char_indices()
        .nth(max - 1)
        .map_or(text.len(), |(at, _)| at);
    let head = &text[..limit];
    let sentence_end = head
        .char_indices()
        .rev()
        .filter(|&(at, c)| {
            matches!(c, '.' | '!' | '?') && text[at + c.len_utf8()..].starts_with(' ')
        })
        .map(|(at, c)| at + c.len_utf8())
        .find(|&end| {
            let chars = text[..end].chars().count();
            chars + 2 <= max && chars * 2 >= max
        });
    if let Some(end) = sentence_end {
        return format!("{} …", &text[..end]);
    }
    let words = if text[limit..].starts_with(' ') {
        head // the head ends exactly at a word end
    } else {
        match head.rfind(' ') {
            Some(space) if space > 0 => &head[..space],
            _ => head, // one word longer than the limit: cut it hard
        }
    };
    let words = words.trim_end_matches([' ', ',', ';', ':', '-', '(']);
    format!("{words}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `secret` is gone and `kept` pieces are still there.
    fn assert_redacted(input: &str, secret: &str, kept: &[&str]) {
        let out = redact(input);
        assert!(!out.contains(secret), "{secret:?} left in {out:?}");
        assert!(out.contains(REDACTED), "{out:?}");
        for piece in kept {
            assert!(out.contains(piece), "{piece:?} lost from {out:?}");
        }
    }

    fn assert_untouched(input: &str) {
        assert_eq!(redact(input), input);
    }

    #[test]
    fn openai_keys() {
        for key in [
            "sk-abcdefghij0123456789ABCDEFGHIJ",
            "sk-proj-Ab3dEfGh1jKlMnOpQrStUvWxYz0123456789_-abc",
            "sk-svcacct-Zz9yXw8vUt7sRq6pOn5mLk4jIh3gFe2dCb1a",
        ] {
            assert_redacted(&format!("key is {key} ok"), key, &["key is ", " ok"]);
        }
        assert_eq!(
            redact("OPENAI_API_KEY=sk-proj-Ab3dEfGh1jKlMnOpQrStUvWx"),
            "OPENAI_API_KEY=[redacted]"
        );
        assert_untouched("use sk-learn and the task-list, risk-free-abcdefghijklmnopqrstuvwxyz");
        assert_untouched("sk-short1");
    }

    #[test]
    fn anthropic_keys() {
        let key = "sk-ant-api03-AbCdEf0123456789_ghIJklMNop-qrSTuv";
        assert_eq!(redact(&format!("x {key} y")), "x [redacted] y");
        assert_untouched("sk-ant-abc"); // too short to be a key
    }

    #[test]
    fn aws_keys() {
        assert_eq!(
            redact("id AKIAIOSFODNN7EXAMPLE and ASIAY34FZKBOKMUTVV7A."),
            "id [redacted] and [redacted]."
        );
        assert_untouched("AKIAIOSFODNN7EXAMPL is short, akiaiosfodnn7example is lowercase");
        assert_eq!(
            redact("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"),
            "aws_secret_access_key = [redacted]\n"
        );
        assert_untouched("aws_region = eu-west-1");
    }

    #[test]
    fn github_tokens() {
        for prefix in ["ghp", "gho", "ghu", "ghs", "ghr"] {
            let token = format!("{prefix}_16C7e42F292c6912E7710c838347Ae178B4a");
            assert_redacted(&format!("push with {token}"), &token, &["push with "]);
        }
        let pat = "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123";
        assert_redacted(pat, pat, &[]);
        assert_untouched("ghp_short and ghx_16C7e42F292c6912E7710c838347Ae178B4a");
    }

    #[test]
    fn gitlab_tokens() {
        assert_eq!(redact("glpat-xxXX1234yyYY5678zzZZ"), REDACTED);
        assert_untouched("glpat-short and glpat-no-digits-in-this-name");
    }

    #[test]
    fn slack_tokens() {
        for token in [
            "xoxb-123456789012-1234567890123-AbCdEfGhIjKl",
            "xoxp-1234-5678-abcdef",
        ] {
            assert_redacted(&format!("token {token}"), token, &[]);
        }
        assert_untouched("xoxo-hugs-and-kisses and xoxq-123456789012");
    }

    #[test]
    fn google_keys() {
        let key = "AIzaSyA1bC2dE3fG4hI5jK6lM7nO8pQ9rS0tU1v";
        assert_eq!(redact(&format!("key={key}")), "key=[redacted]");
        assert_untouched("AIzaSyShort");
    }

    #[test]
    fn stripe_keys() {
        for key in [
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "rk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
        ] {
            assert_redacted(&format!("stripe {key}"), key, &["stripe "]);
        }
        assert_untouched("sk_live_short and sk_prod_4eC39HqLyjWDarjtT1zdp7dc");
    }

    #[test]
    fn hugging_face_tokens() {
        let token = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789";
        assert_redacted(&format!("HF {token}"), token, &["HF "]);
        assert_untouched("call hf_hub_download(repo_id) and hf_abcdefghijklmnopqrstuvwxyzabcdef");
    }

    #[test]
    fn jwts() {
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_eq!(redact(&format!("jwt: {jwt}.")), "jwt: [redacted].");
        assert_untouched("eyJhbGciOiJIUzI1NiJ9 alone is only a header");
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(
            redact("curl -H 'Authorization: Bearer abc123def456ghi789' https://x"),
            "curl -H 'Authorization: Bearer [redacted]' https://x"
        );
        assert_eq!(
            redact(r#"{"Authorization": "Basic dXNlcjpwYXNz"}"#),
            r#"{"Authorization": "Basic [redacted]"}"#
        );
        assert_eq!(
            redact("sent Bearer 0a1b2c3d4e5f6a7b8c9d0e1f"),
            "sent Bearer [redacted]"
        );
        assert_untouched("the bearer of bad news; Bearer authentication is used");
    }

    #[test]
    fn pem_private_keys() {
        let pem = "before\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nabc\n-----END RSA PRIVATE KEY-----\nafter";
        assert_eq!(redact(pem), "before\n[redacted]\nafter");
        let openssh = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----";
        assert_eq!(redact(openssh), REDACTED);
        let unterminated = "key:\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\nmore lines";
        assert_eq!(redact(unterminated), "key:\n[redacted]");
        assert_untouched("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----");
        assert_untouched("-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----");
    }

    #[test]
    fn url_passwords() {
        assert_eq!(
            redact("postgres://admin:hunter2@db.example.com:5432/app"),
            "postgres://admin:[redacted]@db.example.com:5432/app"
        );
        assert_eq!(
            redact("redis://:p@ss@cache:6379"),
            "redis://:[redacted]@cache:6379"
        );
        assert_untouched(
            "https://example.com:8443/path?q=a@b ssh://git@github.com/x user:pass@host",
        );
    }

    #[test]
    fn curl_user_passwords() {
        assert_eq!(
            redact("curl -u admin:hunter2 https://x"),
            "curl -u admin:[redacted] https://x"
        );
        assert_eq!(
            redact("curl --user='bob:pw' x"),
            "curl --user='bob:[redacted]' x"
        );
        assert_untouched("curl -u admin https://x; ls -u a:b; ps -u root:x");
    }

    #[test]
    fn env_assignments() {
        let cases = [
            ("DB_PASSWORD=hunter2", "DB_PASSWORD=[redacted]"),
            (
                "export API_TOKEN=\"abc def\"",
                "export API_TOKEN=\"[redacted]\"",
            ),
            ("client_secret: s3cr3t", "client_secret: [redacted]"),
            ("MYAPP_APIKEY='x1'", "MYAPP_APIKEY='[redacted]'"),
            ("SMTP_PASSWD=pw", "SMTP_PASSWD=[redacted]"),
            ("DB_PWD=pw", "DB_PWD=[redacted]"),
            ("S3_ACCESS_KEY=abc", "S3_ACCESS_KEY=[redacted]"),
            ("SSH_PRIVATE_KEY=abc", "SSH_PRIVATE_KEY=[redacted]"),
            (
                "GOOGLE_CREDENTIALS=/x.json",
                "GOOGLE_CREDENTIALS=[redacted]",
            ),
            ("NPM_AUTH=abc", "NPM_AUTH=[redacted]"),
            ("OAUTH_CLIENT=abc", "OAUTH_CLIENT=[redacted]"),
            (
                r#"{"password": "hunter2", "user": "bob"}"#,
                r#"{"password": "[redacted]", "user": "bob"}"#,
            ),
            (
                r#"{"apiKey":"k-1","accessToken":"t"}"#,
                r#"{"apiKey":"[redacted]","accessToken":"[redacted]"}"#,
            ),
            (
                r#""secret": "a \"quoted\" one""#,
                r#""secret": "[redacted]""#,
            ),
            ("Password: correct horse battery", "Password: [redacted]"),
            ("auth_token = abc def", "auth_token = [redacted] def"),
            (
                "A_TOKEN=x B_SECRET=y",
                "A_TOKEN=[redacted] B_SECRET=[redacted]",
            ),
            (
                "password: a b, token: c}",
                "password: [redacted], token: [redacted]}",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(redact(input), expected, "{input}");
        }
    }

    #[test]
    fn env_assignment_near_misses() {
        assert_untouched("Author: Jane Doe <jane@example.com>");
        assert_untouched("AUTHORS=jane, bob");
        assert_untouched("CERT_AUTHORITY=ca.pem");
        assert_untouched("PWD=/home/user/project OLDPWD=/home/user");
        assert_untouched("USER=bob HOME=/home/bob LANG=C.UTF-8");
        assert_untouched(r#"{"input_tokens":100,"max_tokens": 4096,"is_error":false}"#);
        assert_untouched("TOKEN=\nuse_auth: true, password: null, SECRET: \"\"");
        assert_untouched("if token == other { }");
        assert_untouched("src/auth.rs:42:5: error[E0308]: mismatched types in tokenizer.rs:7");
        assert_untouched("see /etc/secret: no such file");
    }

    #[test]
    fn prose_paths_and_git_output_survive() {
        let text = "commit 3f2a9c1b7d4e5f60718293a4b5c6d7e8f9012345\n\
                    Author: Jane Doe <jane@example.com>\n\
                    Date:   Tue Nov 25 10:00:00 2026 +0000\n\n    \
                    Fix the flaky test in src/tasks/stream.rs (see https://github.com/o/r/pull/12).\n\
                    Merge: 1a2b3c4 5d6e7f8\n\
                    sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
                    I asked for the token budget and the secret sauce; nothing else.";
        assert_untouched(text);
    }

    #[test]
    fn several_secrets_in_one_text() {
        let text = "GITHUB_TOKEN=ghp_16C7e42F292c6912E7710c838347Ae178B4a and sk-proj-Ab3dEfGh1jKlMnOpQrStUvWx";
        assert_eq!(redact(text), "GITHUB_TOKEN=[redacted] and [redacted]");
    }

    #[test]
    fn summary_strips_markdown() {
        let text = "## Summary\n\nI **fixed** the _flaky_ test in `src/ci.rs`:\n\n\
                    ```rust\nlet key = \"sk-proj-Ab3dEfGh1jKlMnOpQrStUvWx\";\n```\n\n\
                    - Added a [retry](https://example.com/retry) helper\n\
                    * Removed ~~old~~ code\n\
                    1. Ran `cargo test`\n\
                    > Note: see ![diagram](d.png)\n\
                    ---\n\
                    | file | change |\n|---|---|\n| a.rs | edited |\n\
                    Keep snake_case_names and 2*3*4 intact";
        assert_eq!(
            speech_summary(text, 1000),
            "Summary. I fixed the flaky test in src/ci.rs: (code omitted). \
             Added a retry helper. Removed old code. Ran cargo test. Note: see diagram. \
             file, change. a.rs, edited. Keep snake_case_names and 2*3*4 intact."
        );
    }

    #[test]
    fn summary_unterminated_fence_and_redaction() {
        let text =
            "Done, token ghp_16C7e42F292c6912E7710c838347Ae178B4a used.\n```\nsecret stuff\n";
        assert_eq!(
            speech_summary(text, 200),
            "Done, token [redacted] used. (code omitted)."
        );
    }

    #[test]
    fn summary_collapses_wrapped_lines() {
        assert_eq!(
            speech_summary("one\n  two\tthree\n\n\nfour", 100),
            "one two three. four."
        );
    }

    #[test]
    fn summary_cuts_at_sentence_then_word() {
        let text = "First sentence is here. Second sentence is a bit longer than the first.";
        let out = speech_summary(text, 40);
        assert_eq!(out, "First sentence is here. …");
        // No sentence end in the first half: cut at a word.
        let text = "A very long first sentence without any stop for quite a while. End.";
        let out = speech_summary(text, 30);
        assert_eq!(out, "A very long first sentence…");
        assert!(out.chars().count() <= 30);
        // A single huge word is cut hard.
        assert_eq!(speech_summary("abcdefghijklmnop", 5), "abcd…");
        assert_eq!(speech_summary("anything", 0), "");
        // Fits: unchanged apart from the added period.
        assert_eq!(speech_summary("Short.", 6), "Short.");
    }

    #[test]
    fn summary_length_bound_holds_for_every_limit() {
        let text = "Réparé le test instable. Ajouté des tests, et mis à jour la doc! Fini? Oui.";
        for max in 0..90 {
            let out = speech_summary(text, max);
            assert!(out.chars().count() <= max, "{max}: {out:?}");
            if max >= 10 && max < text.chars().count() {
                assert!(out.ends_with('…'), "{max}: {out:?}");
            }
        }
    }

    #[test]
    fn cut_drops_trailing_punctuation_at_a_word() {
        assert_eq!(cut("alpha, beta gamma", 8), "alpha…");
        assert_eq!(cut("alpha beta gamma", 11), "alpha beta…");
    }
}
