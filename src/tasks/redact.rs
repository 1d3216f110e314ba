//! Secrets out of everything walkie lets leave: what it speaks or sends to the Realtime model
//! (task summaries, tool outputs, failure reasons), what `walkie ctl` prints (the registry,
//! results, agent logs), the state file, the trace and its own log lines. Pure functions and
//! one small per-task state ([`OutputRedactor`]); no fd, no thread. The patterns are compiled
//! once, on first use, and shared.
//!
//! How a text is redacted:
//! 1. Invisible characters (zero-width spaces and joiners, soft hyphens, bidi marks, word
//!    joiners, byte-order marks) are removed: a key broken by one must still match.
//! 2. Detectors find secrets: keys of a known shape (the formats gitleaks' and
//!    detect-secrets' rule sets cover: OpenAI, Anthropic, AWS, GitHub, GitLab, Slack tokens and
//!    webhooks, Google, Stripe, npm, SendGrid, Twilio, Azure, Hugging Face, JWTs and more), PEM
//!    private keys, passwords in URLs and `curl -u`, `Authorization`/`Bearer` credentials,
//!    values assigned to names that say "secret", long high-entropy tokens after words like
//!    key, secret, token or password, and a bare 40-character AWS secret key near its access
//!    key id.
//! 3. A token broken across lines (a newline inside a key, or a key split over two agent
//!    messages, each rendered as its own line) is found by matching the text with those line
//!    breaks taken out; both halves are redacted, and so is any later copy of either half.
//! 4. A token cut off at an edge (the end of a line, or the "…" a cut leaves) that starts like
//!    a known key is a secret although it is too short to match in full.
//!
//! Every span found is replaced by [`REDACTED`]; the labels around it (header and variable
//! names, URL user and host, quotes) stay, so the text still reads. Ordinary prose, paths and
//! git output (40-hex commit ids, `Author:` lines) must survive: every generic rule has a
//! near-miss test.
//!
//! Shortening: text leaving walkie is redacted whole first and cut after ([`excerpt`],
//! [`speech_summary`], [`speech_excerpt`]), and a cut never leaves part of a key-like token.
//!
//! Speed: agent output is redacted as it arrives, on the poll loop. One case-insensitive
//! Aho-Corasick pass over the text finds the detectors' trigger words; only detectors whose
//! trigger occurs run their regex, so ordinary output costs about one scan.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{LazyLock, OnceLock};

use aho_corasick::{AhoCorasick, AhoCorasickKind};
use regex::{Captures, Regex};

pub const REDACTED: &str = "[redacted]";

/// The span of a match to redact, or None when the match is not a secret after all. It gets
/// the captures and the whole text (some rules look around the match).
type Decide = fn(&Captures, &str) -> Option<Range<usize>>;

/// One rule.
struct Detector {
    regex: Pattern,
    /// Literals of which at least one occurs (in any case) in every match; the detector runs
    /// only when the trigger scan saw one. Empty: it always runs.
    triggers: &'static [&'static str],
    decide: Decide,
}

/// A detector's regex, compiled at start ([`warm_up`]) or on the first text that wakes it.
///
/// The generic rules wake on common words (key, token, `://`) and are compiled at start, off
/// the loop. A key shape wakes only on its own prefix, which most texts never hold: compiling
/// one is small work (tens of µs in a release build) but keeping all of them compiled costs
/// about a megabyte (each compiled regex holds its NFAs, prefilter and per-thread caches), so
/// each is compiled the first time its trigger word occurs and kept from then on.
struct Pattern {
    source: Cow<'static, str>,
    eager: bool,
    compiled: OnceLock<Regex>,
}

impl Pattern {
    fn get(&self) -> &Regex {
        self.compiled.get_or_init(|| compile(&self.source))
    }
}

/// Compiled by [`warm_up`].
fn eager(source: impl Into<Cow<'static, str>>) -> Pattern {
    Pattern {
        source: source.into(),
        eager: true,
        compiled: OnceLock::new(),
    }
}

/// Compiled on first use.
fn lazy(source: &'static str) -> Pattern {
    Pattern {
        source: Cow::Borrowed(source),
        eager: false,
        compiled: OnceLock::new(),
    }
}

fn compile_eager(detectors: &[Detector]) {
    for detector in detectors.iter().filter(|d| d.regex.eager) {
        detector.regex.get();
    }
}

/// The patterns are literals checked by the tests; failing to compile one is a bug.
fn compile(pattern: &str) -> Regex {
    match Regex::new(pattern) {
        Ok(regex) => regex,
        Err(error) => panic!("redaction pattern {pattern:?}: {error}"),
    }
}

/// Capture group 1 is the secret.
fn group(caps: &Captures, _: &str) -> Option<Range<usize>> {
    caps.get(1).map(|m| m.range())
}

/// Group 1, when it holds a digit or both cases: the prefix alone is a plausible word
/// (`sk-some-long-kebab-name`, `hf_hub_download`), a key is random.
fn random_group(caps: &Captures, _: &str) -> Option<Range<usize>> {
    let m = caps.get(1)?;
    mixed(m.as_str()).then(|| m.range())
}

/// Has a digit, or both upper- and lower-case letters.
fn mixed(token: &str) -> bool {
    let b = token.as_bytes();
    b.iter().any(u8::is_ascii_digit)
        || (b.iter().any(u8::is_ascii_uppercase) && b.iter().any(u8::is_ascii_lowercase))
}

/// Keys recognisable by their own shape, wherever they appear: (pattern with the key in
/// group 1, triggers, whether the key must look random, see [`random_group`]).
const KEY_SHAPES: &[(&str, &[&str], bool)] = &[
    // Anthropic, then OpenAI and the many providers that copied its `sk-` (OpenRouter,
    // DeepSeek, …).
    (r"\b(sk-ant-[A-Za-z0-9_\-]{20,})", &["sk-ant-"], true),
    (
        r"\b(sk-(?:proj-|svcacct-|admin-|or-v1-)?[A-Za-z0-9_\-]{20,})",
        &["sk-"],
        true,
    ),
    (
        r"\b((?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16})\b",
        &["a3t", "akia", "asia", "abia", "acca"],
        false,
    ),
    (
        r"\b(gh[pousr]_[A-Za-z0-9]{30,})",
        &["ghp_", "gho_", "ghu_", "ghs_", "ghr_"],
        false,
    ),
    (r"\b(github_pat_[A-Za-z0-9_]{30,})", &["github_pat_"], false),
    (
        r"\b((?:glpat|gldt|glft|glsoat|glrt|glcbt|glptt|glimt|glagent|gloas|glffct)-[A-Za-z0-9_\-]{20,}|GR1348941[A-Za-z0-9_\-]{20,})",
        &[
            "glpat-",
            "gldt-",
            "glft-",
            "glsoat-",
            "glrt-",
            "glcbt-",
            "glptt-",
            "glimt-",
            "glagent-",
            "gloas-",
            "glffct-",
            "gr1348941",
        ],
        true,
    ),
    (
        r"\b(xox[abposre]-[A-Za-z0-9\-]{10,}|xapp-[0-9]-[A-Za-z0-9\-]{10,})",
        &["xox", "xapp-"],
        true,
    ),
    // Webhook URLs: the path is the credential; the host stays readable.
    (
        r"hooks\.slack\.com/(?:services|workflows|triggers)/([A-Za-z0-9+/_\-]{8,})",
        &["hooks.slack.com/"],
        false,
    ),
    (
        r"discord(?:app)?\.com/api/webhooks/([0-9]+/[A-Za-z0-9_\-]+)",
        &["discord"],
        false,
    ),
    (
        r#"\.webhook\.office\.com/webhookb2/([^\s"'<>]+)"#,
        &["webhook.office.com/"],
        false,
    ),
    (r"\b(AIza[0-9A-Za-z_\-]{35})", &["aiza"], false),
    (
        r"\b(GOCSPX-[A-Za-z0-9_\-]{20,}|ya29\.[0-9A-Za-z_\-]{20,})",
        &["gocspx-", "ya29."],
        false,
    ),
    (
        r"\b((?:sk|rk)_(?:live|test|prod)_[A-Za-z0-9]{10,})",
        &[
            "sk_live_", "sk_test_", "sk_prod_", "rk_live_", "rk_test_", "rk_prod_",
        ],
        false,
    ),
    (
        r"\b(hf_[A-Za-z0-9]{30,}|api_org_[A-Za-z0-9]{30,})",
        &["hf_", "api_org_"],
        true,
    ),
    (
        r"\b(eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*)",
        &["eyj"],
        false,
    ),
    (r"\b(npm_[A-Za-z0-9]{30,})", &["npm_"], true),
    (
        r"\b(SG\.[A-Za-z0-9_\-]{16,32}\.[A-Za-z0-9_\-]{16,64})",
        &["sg."],
        false,
    ),
    // Twilio API keys (SK…) and account SIDs (AC…): too common a prefix for a trigger word,
    // so this one always runs (the regex's own literal search keeps it cheap).
    (r"\b((?:SK|AC)[0-9a-fA-F]{32})\b", &[], true),
    // Azure: storage and service-bus connection strings, AD client secrets.
    (
        r#"(?i)\b(?:AccountKey|SharedAccessKey|SharedSecret)=([^;\s"'<>]{8,})"#,
        &["accountkey=", "sharedaccesskey=", "sharedsecret="],
        false,
    ),
    (
        r#"(?:^|[\\'"`\s>=:(,)])([A-Za-z0-9_~.]{3}[0-9]Q~[A-Za-z0-9_~.\-]{31,34})"#,
        &["q~"],
        false,
    ),
    // Signed URLs (Azure SAS, S3 and GCS presigned), API keys in query strings.
    (
        r#"(?i)[?&;](?:sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|key|code)=([^&\s#"'<>]{8,})"#,
        &["sig=", "signature=", "x-amz-", "x-goog-", "key=", "code="],
        false,
    ),
    (
        r"\b(shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32})",
        &["shpat_", "shpca_", "shppa_", "shpss_"],
        false,
    ),
    (r"\b([0-9a-f]{32}-us[0-9]{1,2})\b", &["-us"], false),
    (
        r"\b(sq0(?:atp|csp)-[0-9A-Za-z_\-]{22,})",
        &["sq0atp-", "sq0csp-"],
        false,
    ),
    (r"\b(pypi-AgE[A-Za-z0-9_\-]{50,})", &["pypi-"], false),
    (r"\b(do[opr]_v1_[a-f0-9]{64})", &["_v1_"], false),
    (r"\b(dapi[a-f0-9]{32}(?:-[0-9])?)", &["dapi"], true),
    (
        r"\b(dp\.(?:pt|st|sa|ct|scim|audit)\.[A-Za-z0-9]{40,})",
        &["dp."],
        false,
    ),
    (r"\b(lin_api_[A-Za-z0-9]{40})", &["lin_api_"], false),
    (
        r"\b(PMAK-[a-fA-F0-9]{24}-[a-fA-F0-9]{34})",
        &["pmak-"],
        false,
    ),
    (r"\b(pul-[a-f0-9]{40})", &["pul-"], false),
    (
        r"\b(pplx-[A-Za-z0-9]{40,}|gsk_[A-Za-z0-9]{40,}|xai-[A-Za-z0-9]{40,}|r8_[A-Za-z0-9]{30,}|fw_[A-Za-z0-9]{20,})",
        &["pplx-", "gsk_", "xai-", "r8_", "fw_"],
        true,
    ),
    (
        r"\b(glc_[A-Za-z0-9+/]{32,}={0,2}|glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8})",
        &["glc_", "glsa_"],
        false,
    ),
    (r"\b(hv[sb]\.[A-Za-z0-9_\-]{24,})", &["hvs.", "hvb."], false),
    (
        r"(AGE-SECRET-KEY-1[0-9A-Z]{58})",
        &["age-secret-key-"],
        false,
    ),
    (r"\b(ops_eyJ[A-Za-z0-9+/]{100,}={0,3})", &["ops_eyj"], false),
    (
        r"\b(sntry[su]_[A-Za-z0-9+/=_]{40,})",
        &["sntrys_", "sntryu_"],
        false,
    ),
    (r"\b(ntn_[0-9]{11}[A-Za-z0-9]{35})", &["ntn_"], false),
    (r"\b(ATATT3[A-Za-z0-9_\-=]{100,})", &["atatt3"], false),
    (r"\b(LTAI[A-Za-z0-9]{20})\b", &["ltai"], true),
    (r"\b(HRKU-AA[0-9A-Za-z_\-]{58})", &["hrku-"], false),
    (r"\b([0-9]{8,10}:AA[0-9A-Za-z_\-]{33})", &[":aa"], false),
    (
        r"\b(sbp_[a-f0-9]{40}|nfp_[A-Za-z0-9]{36})",
        &["sbp_", "nfp_"],
        false,
    ),
    (r"\b(v1\.0-[a-f0-9]{24}-[a-f0-9]{146})", &["v1.0-"], false),
    (
        r"\b(dt0c01\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{64})",
        &["dt0c01."],
        false,
    ),
    (
        r"\b([A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9_=\-]{60,70})",
        &[".atlasv1."],
        false,
    ),
    (
        r"\b(sk\.eyJ[A-Za-z0-9_\-]{20,}\.[A-Za-z0-9_\-]{20,})",
        &["sk.eyj"],
        false,
    ),
];

/// Beginnings distinctive enough that a token starting with one and cut off at an edge (a line
/// end, a "…") is a piece of a key. Case matters, as in the keys.
const KEY_PREFIXES: &[&str] = &[
    "sk-ant-",
    "sk-proj-",
    "sk-svcacct-",
    "sk-admin-",
    "sk-",
    "AKIA",
    "ASIA",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "xoxa-",
    "xoxr-",
    "xoxs-",
    "xoxe-",
    "xapp-",
    "AIza",
    "GOCSPX-",
    "sk_live_",
    "sk_test_",
    "rk_live_",
    "rk_test_",
    "hf_",
    "npm_",
    "SG.",
    "eyJ",
    "shpat_",
    "pypi-",
    "dop_v1_",
    "pplx-",
    "gsk_",
    "xai-",
    "r8_",
    "lin_api_",
    "glc_",
    "hvs.",
    "AGE-SECRET-KEY-1",
    "sntrys_",
    "sntryu_",
    "ATATT3",
    "HRKU-AA",
];

/// Names that may say "secret" (checked by [`is_secret_name`]) and the separator with the
/// closing quote of a JSON key. A name starts after a character that cannot be part of it,
/// nor a '/': `src/auth.rs:42` is a path, not an assignment.
const SECRET_NAME: &str = r#"(?i)(?P<pre>^|[^A-Za-z0-9_.\-/])(?P<name>[A-Za-z0-9_.\-]*(?:secret|token|passw(?:or)?d|pwd|api[_\-]?key|access[_\-]?key|private[_\-]?key|credential|auth)[A-Za-z0-9_.\-]*)"#;
const SECRET_NAME_TRIGGERS: &[&str] = &[
    "secret",
    "token",
    "passw",
    "pwd",
    "api_key",
    "api-key",
    "apikey",
    "access_key",
    "access-key",
    "accesskey",
    "private_key",
    "private-key",
    "privatekey",
    "credential",
    "auth",
];
const QUOTED_VALUE: &str = r#""(?:[^"\\\n]|\\.)*"|'[^'\n]*'"#;

/// Every rule, in no particular order: spans found by several are merged.
static DETECTORS: LazyLock<Vec<Detector>> = LazyLock::new(detectors);

fn detectors() -> Vec<Detector> {
    let mut all = vec![
        // PEM private key blocks, including one cut off before its END line.
        Detector {
            regex: eager(
                r"(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\z)",
            ),
            triggers: &["private key"],
            decide: |caps, _| caps.get(0).map(|m| m.range()),
        },
        // `scheme://user:password@host`; the user may be empty (`redis://:pw@host`). The
        // password runs to the last '@' before the path, so an '@' in it leaks nothing.
        Detector {
            regex: eager(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@?#\[\]]*:([^\s/?#]+)@"),
            triggers: &["://"],
            decide: group,
        },
        // `curl -u user:password` / `--user user:password` (in the same command).
        Detector {
            regex: eager(
                r#"\bcurl\b[^\n|;&]*?\s(?:-u|--user)(?:[ \t]+|=)["']?[^\s:"']+:([^\s"']+)"#,
            ),
            triggers: &["curl"],
            decide: group,
        },
        // `Authorization: Bearer …` headers (also JSON and `=` forms); the scheme word stays.
        Detector {
            regex: eager(
                r#"(?i)\b(?:proxy-)?authorization["']?[ \t]*[:=][ \t]*["']?(?:(?:bearer|basic|token|digest|negotiate|bot)[ \t]+)?([^\s"',;]+)"#,
            ),
            triggers: &["authorization"],
            decide: group,
        },
        // A bare `Bearer <token>`: "the bearer of bad news" is prose; a token is long and
        // has a digit somewhere.
        Detector {
            regex: eager(r"(?i)\bbearer[ \t]+([A-Za-z0-9\-._~+/]+=*)"),
            triggers: &["bearer"],
            decide: |caps, _| {
                let m = caps.get(1)?;
                let token = m.as_str();
                (token.len() >= 16 && token.bytes().any(|b| b.is_ascii_digit())).then(|| m.range())
            },
        },
        // `NAME=value`, `export NAME="value"`, `name = "value"` (TOML, Python): a shell-style
        // value ends at whitespace.
        Detector {
            regex: eager(format!(
                r#"{SECRET_NAME}(?P<sep>["']?[ \t]*=[ \t]*)(?P<value>{QUOTED_VALUE}|[^\s"'`,;}}\]]+)"#
            )),
            triggers: SECRET_NAME_TRIGGERS,
            decide: assignment,
        },
        // `NAME: value` (YAML, prose, JSON `"name": "value"`): an unquoted value may hold
        // spaces and runs to the end of the line or the next `,` `;` `}`.
        Detector {
            regex: eager(format!(
                r#"{SECRET_NAME}(?P<sep>["']?[ \t]*:[ \t]*)(?P<value>{QUOTED_VALUE}|[^\s"'`,;}}\]]+(?:[ \t]+[^\s"'`,;}}\]]+)*)"#
            )),
            triggers: SECRET_NAME_TRIGGERS,
            decide: assignment,
        },
        // A long random-looking token after a word like key, secret, token or password
        // ("the token is 3f9a…", `api-key: 0123abcd…`, `X-Signature 9f…`).
        Detector {
            regex: eager(
                r#"(?i)(?:key|secret|token|passw(?:or)?d|pwd|credential|creds|signature)[A-Za-z0-9_.\-]{0,30}["'`\]]{0,2}(?:[ \t]*(?::=|=>|->|[:=])[ \t]*|[ \t]+(?:(?:is|was|of|for|as)[ \t]+)?)["'`]?([A-Za-z0-9+/_\-~]{16,}={0,3})"#,
            ),
            triggers: &[
                "key",
                "secret",
                "token",
                "passw",
                "pwd",
                "credential",
                "creds",
                "signature",
            ],
            decide: |caps, _| {
                let m = caps.get(1)?;
                looks_random(m.as_str()).then(|| m.range())
            },
        },
        // A bare 40-character AWS secret access key when an access key id is near it (or its
        // beginning, cut off at a line end).
        Detector {
            regex: eager(
                // Leftmost-first and greedy: every match is a whole run of these characters.
                r"([A-Za-z0-9+/]{12,})",
            ),
            triggers: &["a3t", "akia", "asia", "abia", "acca"],
            decide: aws_secret_near_key_id,
        },
        // A known key's beginning cut off at an edge: a line end, the end of the text, "…".
        Detector {
            regex: eager(format!(
                r"(?m)\b((?:{})[A-Za-z0-9_\-]*)(?:…|\r?$)",
                KEY_PREFIXES
                    .iter()
                    .map(|p| regex::escape(p))
                    .collect::<Vec<_>>()
                    .join("|")
            )),
            triggers: KEY_PREFIXES,
            decide: cut_off_key,
        },
    ];
    all.extend(
        KEY_SHAPES
            .iter()
            .map(|&(pattern, triggers, random)| Detector {
                regex: lazy(pattern),
                triggers,
                decide: if random { random_group } else { group },
            }),
    );
    all
}

/// The trigger scan: every trigger word of every detector, matched case-insensitively and
/// overlapping, and for each word the detectors it wakes.
struct TriggerScan {
    words: AhoCorasick,
    wakes: Vec<Vec<usize>>,
    always: Vec<usize>,
}

static TRIGGERS: LazyLock<TriggerScan> = LazyLock::new(|| {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut words: Vec<&str> = Vec::new();
    let mut wakes: Vec<Vec<usize>> = Vec::new();
    let mut always = Vec::new();
    for (d, detector) in DETECTORS.iter().enumerate() {
        if detector.triggers.is_empty() {
            always.push(d);
        }
        for &word in detector.triggers {
            let w = *index.entry(word).or_insert_with(|| {
                words.push(word);
                wakes.push(Vec::new());
                words.len() - 1
            });
            wakes[w].push(d);
        }
    }
    // A DFA: several times faster than the default NFA on this many case-folded words, and
    // small (a few hundred KiB once).
    let words = match AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .kind(Some(AhoCorasickKind::DFA))
        .build(&words)
    {
        Ok(ac) => ac,
        Err(error) => panic!("redaction trigger words: {error}"),
    };
    TriggerScan {
        words,
        wakes,
        always,
    }
});

/// Which detectors may match somewhere in `text`.
fn woken(text: &str) -> Vec<bool> {
    let scan = &*TRIGGERS;
    let mut on = vec![false; DETECTORS.len()];
    for &d in &scan.always {
        on[d] = true;
    }
    let mut left = on.iter().filter(|o| !**o).count();
    for m in scan.words.find_overlapping_iter(text) {
        for &d in &scan.wakes[m.pattern().as_usize()] {
            if !on[d] {
                on[d] = true;
                left -= 1;
            }
        }
        if left == 0 {
            break;
        }
    }
    on
}

/// `NAME=value` / `NAME: value`: the value without its quotes, unless the name does not say
/// "secret" or the value is obviously not one.
fn assignment(caps: &Captures, _: &str) -> Option<Range<usize>> {
    let name = caps["name"].to_ascii_uppercase();
    let value_match = caps.name("value")?;
    let value = value_match.as_str();
    let unquoted = value.trim_matches(|c| c == '"' || c == '\'');
    let keep = !is_secret_name(&name)
        // `auth.rs:42:5` is a compiler location.
        || (name.contains('.') && caps["sep"].contains(':') && value.starts_with(|c: char| c.is_ascii_digit()))
        // The header rule keeps the scheme word and redacts the credential.
        || name.ends_with("AUTHORIZATION")
        || unquoted.is_empty()
        // Already redacted (the value pattern stops before its ']').
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
        return None;
    }
    let quoted = value.starts_with(['"', '\'']) && value.len() >= 2;
    let range = value_match.range();
    Some(if quoted {
        range.start + 1..range.end - 1
    } else {
        range
    })
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
    if WORDS.iter().any(|word| name.contains(word))
        || name.contains("PRIVATEKEY")
        || name.contains("PRIVATE-KEY")
    {
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

/// Shannon entropy of `token`, in bits per character.
fn entropy(token: &str) -> f64 {
    let mut counts = [0u32; 128];
    let mut total = 0u32;
    for b in token.bytes().filter(u8::is_ascii) {
        counts[b as usize] += 1;
        total += 1;
    }
    if total == 0 {
        return 0.0;
    }
    let total = f64::from(total);
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / total;
            -p * p.log2()
        })
        .sum()
}

/// A token that reads like generated key material rather than a word, a path or a version:
/// long, letters and digits mixed, and high entropy (the thresholds detect-secrets and
/// gitleaks use: 3.0 bits/char for hex, 3.5 for the rest).
fn looks_random(token: &str) -> bool {
    let b = token.as_bytes();
    let digits = b.iter().any(u8::is_ascii_digit);
    let letters = b.iter().any(u8::is_ascii_alphabetic);
    if !(digits && letters) {
        return false;
    }
    if b.iter().all(u8::is_ascii_hexdigit) {
        b.len() >= 32 && entropy(token) >= 3.0
    } else {
        b.len() >= 16 && entropy(token) >= 3.5
    }
}

/// How far from a 40-character token an AWS access key id makes it the secret key.
const AWS_PAIR_DISTANCE: usize = 256;

static AWS_KEY_ID: LazyLock<Regex> =
    LazyLock::new(|| compile(r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"));

fn aws_secret_near_key_id(caps: &Captures, text: &str) -> Option<Range<usize>> {
    let m = caps.get(1)?;
    let token = m.as_str().as_bytes();
    let rest = &text[m.end()..];
    let at_line_end = rest.is_empty() || rest.starts_with(['\n', '\r']);
    let whole_or_cut = token.len() == 40 || (token.len() < 40 && at_line_end);
    if !whole_or_cut {
        return None;
    }
    let random = token.iter().any(u8::is_ascii_digit)
        && token.iter().any(u8::is_ascii_uppercase)
        && token.iter().any(u8::is_ascii_lowercase);
    if !random {
        return None;
    }
    let from = floor_boundary(text, m.start().saturating_sub(AWS_PAIR_DISTANCE));
    let to = ceil_boundary(text, (m.end() + AWS_PAIR_DISTANCE).min(text.len()));
    AWS_KEY_ID.is_match(&text[from..to]).then(|| m.range())
}

/// A known key's beginning at an edge: long enough to be more than the prefix, and random.
fn cut_off_key(caps: &Captures, _: &str) -> Option<Range<usize>> {
    let m = caps.get(1)?;
    let token = m.as_str();
    let prefix = KEY_PREFIXES
        .iter()
        .filter(|p| token.starts_with(**p))
        .map(|p| p.len())
        .max()?;
    let body = &token[prefix..];
    (body.len() >= 3 && mixed(body)).then(|| m.range())
}

fn floor_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn ceil_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// Characters with no glyph that can sit inside a key without showing: zero-width spaces,
/// joiners and non-joiners, soft hyphens, bidi marks and embeddings, word joiners and
/// invisible operators, byte-order marks, variation selectors, tag characters.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// The text secrets are matched in: the original without its invisible characters. Spans
/// found in it are mapped back to the original, which is what is shown (redacted): the
/// characters are removed for matching only.
struct Normalized<'a> {
    text: Cow<'a, str>,
    /// At each place characters were removed: (offset in `text`, bytes removed up to and
    /// including there).
    removed: Vec<(usize, usize)>,
}

impl Normalized<'_> {
    /// The same span in the original text; invisible characters inside it go with it.
    fn original(&self, range: &Range<usize>) -> Range<usize> {
        let before = |pos: usize, inclusive: bool| {
            let n = self
                .removed
                .partition_point(|&(at, _)| if inclusive { at <= pos } else { at < pos });
            n.checked_sub(1).map_or(0, |i| self.removed[i].1)
        };
        range.start + before(range.start, true)..range.end + before(range.end, false)
    }

    /// `found` (spans of `text`) as spans of the original.
    fn to_original(&self, found: &mut [Found]) {
        if self.removed.is_empty() {
            return;
        }
        for f in found {
            f.range = self.original(&f.range);
        }
    }
}

/// `text` without invisible characters. A joiner or variation selector right after a
/// non-ASCII character (inside an emoji sequence) stays: it breaks no key there.
fn normalize(text: &str) -> Normalized<'_> {
    if text.is_ascii() || !text.chars().any(is_invisible) {
        return Normalized {
            text: Cow::Borrowed(text),
            removed: Vec::new(),
        };
    }
    let mut out = String::with_capacity(text.len());
    let mut removed: Vec<(usize, usize)> = Vec::new();
    let mut total = 0;
    let mut previous = ' ';
    for c in text.chars() {
        let emoji_glue = matches!(c, '\u{200D}' | '\u{FE00}'..='\u{FE0F}') && !previous.is_ascii();
        if is_invisible(c) && !emoji_glue {
            total += c.len_utf8();
            match removed.last_mut() {
                Some(last) if last.0 == out.len() => last.1 = total,
                _ => removed.push((out.len(), total)),
            }
            continue;
        }
        out.push(c);
        previous = c;
    }
    Normalized {
        text: Cow::Owned(out),
        removed,
    }
}

/// A secret found: where it is, and whether it is one half of a token broken across a line
/// (such pieces are remembered, see [`OutputRedactor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    range: Range<usize>,
    piece: bool,
}

/// Every secret in `text` (already normalised): direct matches, then tokens broken across
/// lines.
fn scan(text: &str, found: &mut Vec<Found>) {
    scan_direct(text, &mut |range| {
        found.push(Found {
            range,
            piece: false,
        })
    });
    scan_joined(text, found);
}

fn scan_direct(text: &str, out: &mut dyn FnMut(Range<usize>)) {
    let on = woken(text);
    for (detector, _) in DETECTORS.iter().zip(&on).filter(|(_, on)| **on) {
        for caps in detector.regex.get().captures_iter(text) {
            if let Some(range) = (detector.decide)(&caps, text) {
                if !range.is_empty() {
                    out(range);
                }
            }
        }
    }
}

/// Characters a token broken by a line break may hold on both sides of it.
fn is_join_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+' | b'/' | b'=')
}

/// The shortest run of token characters on each side of a line break worth joining, and of
/// both together: shorter runs are words, not halves of keys.
const JOIN_SIDE_MIN: usize = 3;
const JOIN_TOTAL_MIN: usize = 10;
/// How far a run is followed from the break, and how much of the lines around a break is
/// matched with it (enough for a name and a separator before a key, and the key).
const JOIN_LOOK: usize = 256;

/// Lines around line breaks, matched again with the breaks (byte ranges) taken out.
struct JoinWindow {
    start: usize,
    end: usize,
    breaks: Vec<(usize, usize)>,
}

/// Tokens broken by a line break. The lines around each break that falls between two token
/// runs (with a digit between them: keys have digits, wrapped prose and code rarely do at a
/// line end) are matched again with the break taken out; a match that spans a removed break
/// yields its pieces on each side of it.
fn scan_joined(text: &str, found: &mut Vec<Found>) {
    let bytes = text.as_bytes();
    let mut windows: Vec<JoinWindow> = Vec::new();
    for (at, _) in text.match_indices('\n') {
        let start = if at > 0 && bytes[at - 1] == b'\r' {
            at - 1
        } else {
            at
        };
        let left = bytes[..start]
            .iter()
            .rev()
            .take(JOIN_LOOK)
            .take_while(|b| is_join_char(**b))
            .count();
        let right = bytes[at + 1..]
            .iter()
            .take(JOIN_LOOK)
            .take_while(|b| is_join_char(**b))
            .count();
        let run = &bytes[start - left..at + 1 + right];
        if left < JOIN_SIDE_MIN
            || right < JOIN_SIDE_MIN
            || left + right < JOIN_TOTAL_MIN
            || !run.iter().any(u8::is_ascii_digit)
        {
            continue;
        }
        let from = floor_boundary(text, start.saturating_sub(JOIN_LOOK));
        let from = text[from..start]
            .rfind('\n')
            .map_or(from, |nl| from + nl + 1);
        let to = ceil_boundary(text, (at + 1 + JOIN_LOOK).min(text.len()));
        let to = text[at + 1..to].find('\n').map_or(to, |nl| at + 1 + nl);
        match windows.last_mut() {
            Some(window) if window.end >= from => {
                window.end = window.end.max(to);
                window.breaks.push((start, at + 1));
            }
            _ => windows.push(JoinWindow {
                start: from,
                end: to,
                breaks: vec![(start, at + 1)],
            }),
        }
    }
    if windows.is_empty() {
        return;
    }
    // The windows joined, one after another (a blank line apart, which nothing joins), as
    // segments of the original: (joined start, original start, length).
    let mut joined = String::new();
    let mut segments: Vec<(usize, usize, usize)> = Vec::new();
    for window in &windows {
        let mut from = window.start;
        let last = (window.end, window.end);
        for &(cut_start, cut_end) in window.breaks.iter().chain(std::iter::once(&last)) {
            segments.push((joined.len(), from, cut_start - from));
            joined.push_str(&text[from..cut_start]);
            from = cut_end;
        }
        joined.push_str("\n\n");
    }
    scan_direct(&joined, &mut |range| {
        let pieces: Vec<Range<usize>> = segments
            .iter()
            .filter_map(|&(j, o, len)| {
                let start = range.start.max(j);
                let end = range.end.min(j + len);
                (start < end).then(|| o + (start - j)..o + (end - j))
            })
            .collect();
        if pieces.len() > 1 {
            let mut pieces = pieces;
            // Greedy patterns run on into the next line's first word after a key that
            // ended there: a plain word is not taken as the key's end.
            if pieces
                .last()
                .is_some_and(|last| plain_word(&text[last.clone()]))
            {
                pieces.pop();
            }
            found.extend(pieces.into_iter().map(|range| Found { range, piece: true }));
        }
    });
}

/// A lowercase or capitalised word: prose, not the end of a key.
fn plain_word(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 2
        && b.iter().all(u8::is_ascii_alphabetic)
        && b[1..].iter().all(u8::is_ascii_lowercase)
}

/// The shortest piece of a broken secret that is remembered and redacted wherever it shows
/// up again; shorter ones are too likely to be ordinary text.
const PIECE_MIN: usize = 8;
/// Pieces remembered per task (the oldest is forgotten first).
const PIECES_MAX: usize = 32;
/// The longest piece remembered.
const PIECE_MAX: usize = 512;

/// Adds a span for every occurrence of a remembered piece.
fn find_pieces<'a>(
    text: &str,
    pieces: impl IntoIterator<Item = &'a String>,
    found: &mut Vec<Found>,
) {
    for piece in pieces {
        for (at, _) in text.match_indices(piece.as_str()) {
            found.push(Found {
                range: at..at + piece.len(),
                piece: false,
            });
        }
    }
}

/// Replaces the (sorted, merged) spans with [`REDACTED`].
fn apply(text: &str, found: &mut [Found]) -> String {
    if found.is_empty() {
        return text.to_owned();
    }
    found.sort_by_key(|f| (f.range.start, f.range.end));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut i = 0;
    while i < found.len() {
        let start = found[i].range.start.max(at);
        let mut end = found[i].range.end;
        i += 1;
        // Overlapping or touching spans become one.
        while i < found.len() && found[i].range.start <= end {
            end = end.max(found[i].range.end);
            i += 1;
        }
        if start >= end {
            continue;
        }
        out.push_str(&text[at..start]);
        out.push_str(REDACTED);
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// Pieces of broken tokens found in `found` that are long enough to remember.
fn pieces_of<'t>(text: &'t str, found: &[Found]) -> impl Iterator<Item = &'t str> {
    found
        .iter()
        .filter(|f| f.piece && f.range.len() >= PIECE_MIN && f.range.len() <= PIECE_MAX)
        .map(|f| &text[f.range.clone()])
}

/// Compiles the patterns used at once now (the key shapes are left to their first use, see
/// [`Pattern`]). The daemon calls this at start so the first tool call or summary on the loop
/// does not pay for regex compilation (tens of ms in a debug build).
pub fn warm_up() {
    compile_eager(&DETECTORS);
    let _ = speech_summary(
        "warm up: Bearer abc sk-proj-0123456789abcdefghij https://u:p@h DB_PASSWORD=x \
         key: 0123456789abcdefABCDEF\nsk-ant-0123\n456789",
        80,
    );
}

/// `text` with every recognised secret replaced by [`REDACTED`] (matched with invisible
/// characters left out, so one inside a key does not hide it); labels around a secret (header names, variable names, URL user and host,
/// quotes) are kept so the text still reads.
pub fn redact(text: &str) -> String {
    redact_with(text, std::iter::empty())
}

/// [`redact`], also redacting every occurrence of the remembered `pieces`.
fn redact_with<'a>(text: &str, pieces: impl IntoIterator<Item = &'a String>) -> String {
    let normal = normalize(text);
    let view = &*normal.text;
    let mut found = Vec::new();
    scan(view, &mut found);
    // A half of a broken key may appear again whole elsewhere in the same text.
    let own: Vec<String> = pieces_of(view, &found).map(str::to_owned).collect();
    find_pieces(view, &own, &mut found);
    find_pieces(view, pieces, &mut found);
    normal.to_original(&mut found);
    apply(text, &mut found)
}

/// A window of agent output that may begin in the middle of it (the tail kept in memory,
/// the end of a log file): [`redact`], and what the window's start cut off is taken for a
/// secret: a first word that could be the end of a key, and the rest of a private key whose
/// BEGIN line fell before the window.
pub fn redact_log(text: &str) -> String {
    let normal = normalize(text);
    let view = &*normal.text;
    let mut found = Vec::new();
    scan(view, &mut found);
    let own: Vec<String> = pieces_of(view, &found).map(str::to_owned).collect();
    find_pieces(view, &own, &mut found);
    if let Some(range) = cut_off_start(view) {
        found.push(Found {
            range,
            piece: false,
        });
    }
    normal.to_original(&mut found);
    apply(text, &mut found)
}

/// What a window's start may have cut off: the body of a private key (only base64 lines up
/// to its END line), else a first word that could be a piece of a key.
fn cut_off_start(text: &str) -> Option<Range<usize>> {
    if let Some(end) = PEM_END.find(text) {
        let body = &text[..end.start()];
        let base64 = |line: &str| {
            line.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'\r'))
        };
        if !body.trim().is_empty() && body.lines().all(base64) {
            return Some(0..end.end());
        }
    }
    let start = text.len() - text.trim_start().len();
    let word = text[start..].split(char::is_whitespace).next()?;
    key_like(word).then(|| start..start + word.len())
}

/// [`redact`] for text derived from an agent's output by another path (its final answer, a
/// failure reason): pieces of secrets that `context` (the output) shows broken across lines
/// are redacted wherever they appear in `text`, so the half of a key that is the whole of the
/// last message does not reach the summary.
pub fn scrub(text: &str, context: &str) -> String {
    let context = normalize(context).text;
    let mut found = Vec::new();
    scan_joined(&context, &mut found);
    let pieces: Vec<String> = pieces_of(&context, &found).map(str::to_owned).collect();
    redact_with(text, &pieces)
}

fn replace(text: &mut Cow<'_, str>, regex: &Regex, rep: impl FnMut(&Captures) -> String) {
    if let Cow::Owned(replaced) = regex.replace_all(text, rep) {
        *text = Cow::Owned(replaced);
    }
}

/// Bytes of the previous piece of output kept as context for the next one.
const CARRY_MAX: usize = 256;

static PEM_BEGIN: LazyLock<Regex> =
    LazyLock::new(|| compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"));
static PEM_END: LazyLock<Regex> =
    LazyLock::new(|| compile(r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"));

/// Redacts a task's output piece by piece as it is streamed to someone following it
/// (`walkie ctl logs --follow`). Output kept or read as a whole goes through [`redact_log`]
/// when it is read instead: redacting every byte agents print on the loop would cost more
/// than the rest of their handling.
///
/// Output comes in pieces (one per read of the agent's pipe, each event rendered as its own
/// line), and a secret may straddle two of them: a key whose second half is the next
/// stream-json message, a private key printed over several writes. Each piece is therefore
/// matched together with the end of the one before (kept unredacted here, never shown),
/// a private key block left open keeps redacting until its END line, and the pieces of a
/// secret found straddling a boundary are remembered, so a later copy of either half (the
/// `result` line repeats the last message) is redacted as well.
#[derive(Debug, Default)]
pub struct OutputRedactor {
    /// The end of the previous piece: its last line, at most [`CARRY_MAX`] bytes.
    carry: String,
    /// A PEM private key block began and has not ended yet.
    in_private_key: bool,
    /// Pieces of secrets that were split, oldest first.
    pieces: VecDeque<String>,
}

impl OutputRedactor {
    pub fn new() -> OutputRedactor {
        OutputRedactor::default()
    }

    /// A redactor for the pieces that follow `before` (what was already shown, unredacted).
    pub fn after(before: &str) -> OutputRedactor {
        let mut redactor = OutputRedactor::new();
        let before = normalize(before).text;
        redactor.note_private_key(&before);
        redactor.keep_carry(&before);
        redactor
    }

    /// The redacted form of the next piece of output.
    pub fn redact_piece(&mut self, original: &str) -> String {
        let normal = normalize(original);
        let mut context = String::with_capacity(self.carry.len() + normal.text.len());
        context.push_str(&self.carry);
        let offset = context.len();
        context.push_str(&normal.text);
        let mut found = Vec::new();
        if self.in_private_key {
            let end = PEM_END.find(&context[offset..]).map(|m| offset + m.end());
            found.push(Found {
                range: offset..end.unwrap_or(context.len()),
                piece: false,
            });
        }
        scan(&context, &mut found);
        let mut learned = Vec::new();
        for f in &found {
            // A secret that began in the carry continues into this piece: both parts are
            // pieces of it.
            let straddles = f.range.start < offset && f.range.end > offset;
            if straddles {
                learned.push(context[f.range.start..offset].to_owned());
                learned.push(context[offset..f.range.end].to_owned());
            } else if f.piece {
                learned.push(context[f.range.clone()].to_owned());
            }
        }
        for piece in learned {
            self.remember(piece);
        }
        find_pieces(&context, &self.pieces, &mut found);
        // Only this piece is emitted: spans in the carry were dealt with last time.
        let mut mine: Vec<Found> = found
            .into_iter()
            .filter(|f| f.range.end > offset)
            .map(|f| Found {
                range: f.range.start.max(offset) - offset..f.range.end - offset,
                piece: false,
            })
            .collect();
        normal.to_original(&mut mine);
        let out = apply(original, &mut mine);
        self.note_private_key(&context[offset..]);
        self.keep_carry(&context[offset..]);
        out
    }

    fn remember(&mut self, piece: String) {
        if piece.len() < PIECE_MIN || piece.len() > PIECE_MAX || self.pieces.contains(&piece) {
            return;
        }
        if self.pieces.len() == PIECES_MAX {
            self.pieces.pop_front();
        }
        self.pieces.push_back(piece);
    }

    fn note_private_key(&mut self, piece: &str) {
        let last_begin = PEM_BEGIN.find_iter(piece).last().map(|m| m.end());
        match last_begin {
            Some(begin) => self.in_private_key = !PEM_END.is_match(&piece[begin..]),
            None if self.in_private_key => self.in_private_key = !PEM_END.is_match(piece),
            None => {}
        }
    }

    fn keep_carry(&mut self, piece: &str) {
        let body = piece.strip_suffix('\n').unwrap_or(piece);
        let line_start = body.rfind('\n').map_or(0, |at| at + 1);
        let start = ceil_boundary(piece, line_start.max(piece.len().saturating_sub(CARRY_MAX)));
        if line_start == 0 && start == 0 && !self.carry.ends_with('\n') {
            // The piece continues the carried line.
            self.carry.push_str(piece);
            let cut = ceil_boundary(&self.carry, self.carry.len().saturating_sub(CARRY_MAX));
            self.carry.drain(..cut);
        } else {
            self.carry.clear();
            self.carry.push_str(&piece[start..]);
        }
    }
}

/// Which end of a text an excerpt keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Head,
    Tail,
}

/// The one way text leaving walkie is shortened: `text` is redacted whole first, then cut
/// to at most `max_chars` characters at a word boundary, with "…" where it was cut. A word
/// cut in two that could be a piece of a key is left out rather than shown in part.
pub fn excerpt(text: &str, max_chars: usize, keep: Keep) -> String {
    let redacted = redact(text);
    match keep {
        Keep::Head => cut(&redacted, max_chars),
        Keep::Tail => cut_tail(&redacted, max_chars),
    }
}

/// redact + make it speakable: strip markdown (code fences → "(code omitted)", headings,
/// bullets, emphasis, links → their text, inline code ticks), collapse whitespace, cut at a
/// sentence or word boundary so the result is ≤ max_chars (append "…" when cut).
pub fn speech_summary(text: &str, max_chars: usize) -> String {
    speech_excerpt(text, max_chars, Keep::Head)
}

/// [`speech_summary`] of either end of `text`: `Keep::Tail` gives the most recent output
/// of a running task, starting with "…" when it was cut. For the tail only the last lines,
/// a wide margin beyond `max_chars`, are read (the output can be long and this runs on
/// the loop), as a log window: redacted whole, with what its start cut off taken for a
/// secret ([`redact_log`]), before they are cut to size.
pub fn speech_excerpt(text: &str, max_chars: usize, keep: Keep) -> String {
    let redacted = match keep {
        Keep::Head => redact(text),
        Keep::Tail => redact_log(last_lines(text, max_chars.saturating_mul(8).max(4096))),
    };
    let plain = strip_markdown(&redacted);
    // Stripping markup can join what it separated; one more pass costs little.
    let plain = redact(&plain);
    match keep {
        Keep::Head => cut(&plain, max_chars),
        Keep::Tail => cut_tail(&plain, max_chars),
    }
}

/// The end of `text`, at most `max_bytes` long, starting at a line start.
fn last_lines(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let from = ceil_boundary(text, text.len() - max_bytes);
    match text[from..].find('\n') {
        Some(newline) => &text[from + newline + 1..],
        None => &text[from..],
    }
}

/// A word that could be (a piece of) a key: long, of key characters, with a digit.
fn key_like(word: &str) -> bool {
    word.len() >= 8
        && word.bytes().any(|b| b.is_ascii_digit())
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-+/=.~:".contains(&b))
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
/// at least half) followed by " …", else up to the last word followed by "…". A single word
/// longer than the limit is cut hard, unless it could be a key: then it is left out.
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
    let words = if text[limit..].starts_with(char::is_whitespace) {
        head // the head ends exactly at a word end
    } else {
        match head.rfind(char::is_whitespace) {
            Some(space) if space > 0 => &head[..space],
            // One word longer than the limit.
            _ => {
                let word = text.split(char::is_whitespace).next().unwrap_or(text);
                if key_like(word) { "" } else { head }
            }
        }
    };
    let words = words.trim_end_matches([' ', '\t', '\n', ',', ';', ':', '-', '(']);
    format!("{words}…")
}

/// At most `max` chars from the end: whole when it fits; else "…" and the last words, never
/// starting inside a word (the cut-off piece could be part of a key).
fn cut_tail(text: &str, max: usize) -> String {
    let total = text.chars().count();
    if total <= max {
        return text.to_owned();
    }
    if max == 0 {
        return String::new();
    }
    // Byte offset of the last max-1 chars: room for the ellipsis.
    let from = text
        .char_indices()
        .nth(total - (max - 1))
        .map_or(text.len(), |(at, _)| at);
    let mut tail = &text[from..];
    let inside_word =
        !text[..from].ends_with(char::is_whitespace) && !tail.starts_with(char::is_whitespace);
    if inside_word {
        tail = match tail.find(char::is_whitespace) {
            Some(space) => &tail[space..],
            None => "",
        };
    }
    format!("…{}", tail.trim_start())
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_shapes_compile_on_first_use_and_the_rest_at_warm_up() {
        let list = super::detectors();
        super::compile_eager(&list);
        let (eager, lazy): (Vec<_>, Vec<_>) = list.iter().partition(|d| d.regex.eager);
        assert_eq!(lazy.len(), super::KEY_SHAPES.len());
        assert!(eager.iter().all(|d| d.regex.compiled.get().is_some()));
        assert!(lazy.iter().all(|d| d.regex.compiled.get().is_none()));
        // Every pattern compiles (a lazy one would otherwise fail only when its key shows up).
        for d in &lazy {
            assert!(!d.regex.get().as_str().is_empty());
        }
    }

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
        assert_untouched("sk-short1 is too short");
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
        assert_untouched("AIzaSyShort is short");
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
        assert_redacted(
            "sk_prod_4eC39HqLyjWDarjtT1zdp7dc",
            "sk_prod_4eC39HqLyjWDarjtT1zdp7dc",
            &[],
        );
        assert_untouched("sk_live_short and sk_demo_4eC39HqLyjWDarjtT1zdp7dc");
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

    /// Every format the issue and the reference scanners name, as an agent might print it:
    /// (the secret, the text around it). Each must disappear from every output path.
    pub(crate) const SAMPLES: &[(&str, &str)] = &[
        (
            "sk-proj-Ab3dEfGh1jKlMnOpQrStUvWxYz0123456789_-abc",
            "key is {} ok",
        ),
        ("sk-ant-api03-AbCdEf0123456789_ghIJklMNop-qrSTuv", "x {} y"),
        ("AKIAIOSFODNN7EXAMPLE", "id {}."),
        ("ghp_16C7e42F292c6912E7710c838347Ae178B4a", "push with {}"),
        (
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123",
            "{}",
        ),
        ("glpat-xxXX1234yyYY5678zzZZ", "token {}"),
        ("xoxb-123456789012-1234567890123-AbCdEfGhIjKl", "slack {}"),
        (
            "T0A1B2C3D/B0E4F5G6H/abcDEF0123ghiJKL4567mnop",
            "https://hooks.slack.com/services/{}",
        ),
        ("AIzaSyA1bC2dE3fG4hI5jK6lM7nO8pQ9rS0tU1v", "maps {}"),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe {}"),
        ("hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789", "HF {}"),
        (
            "npm_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
            "//registry.npmjs.org/:_authToken={}",
        ),
        (
            "npm_Z9y8X7w6V5u4T3s2R1q0P9o8N7m6L5k4J3i2",
            "publish with {} now",
        ),
        (
            "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",
            "mail {}",
        ),
        ("SK0123456789abcdef0123456789abcdef", "twilio key {} set"),
        ("AC0123456789abcdef0123456789abcdef", "sid {},"),
        (
            "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==",
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={};EndpointSuffix=core.windows.net",
        ),
        (
            "abc8Q~defGHIjklMNOpqrSTUvwxYZ0123456789ab",
            "client secret: '{}'",
        ),
        (
            "AbCdEf0123456789%2BxyzXYZ%3D",
            "https://acct.blob.core.windows.net/c?sv=2022-11-02&sp=r&sig={}&se=2030",
        ),
        (
            "0123456789abcdef0123456789abcdef",
            "Ocp-Apim-Subscription-Key: {}",
        ),
        (
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "{} belongs to AKIAIOSFODNN7EXAMPLE",
        ),
        (
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "jwt {}",
        ),
        ("hunter2", "postgres://admin:{}@db.example.com:5432/app"),
        ("correct-horse-battery-staple", "DB_PASSWORD={}"),
        (
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",
            "the token is {}",
        ),
        ("Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg", "secret {}"),
        ("shpat_0123456789abcdef0123456789abcdef", "shopify {}"),
        ("0123456789abcdef0123456789abcdef-us21", "mailchimp {}"),
        (
            "pypi-AgEIcHlwaS5vcmcCJGFiY2RlZmdoLWlqa2wtbW5vcC1xcnN0LXV2d3h5ejAxMjM0",
            "upload {}",
        ),
        (
            "dop_v1_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "do {}",
        ),
        (
            "glc_eyJvIjoiMTIzNDU2IiwibiI6InN0YWNrIiwiayI6ImFiYyJ9AbCd",
            "grafana {}",
        ),
        ("hvs.CAESIJ0123456789abcdefGHIJKLmnopQRSTuvwx", "vault {}"),
        ("sq0csp-0123456789ABCDEFabcdefGHIJKLmnop", "square {}"),
        (
            "123456789:AAEhBP0av28bM0uQ-5b5Z0123456789ABCD",
            "telegram {}",
        ),
    ];

    fn sample_text(secret: &str, around: &str) -> String {
        around.replace("{}", secret)
    }

    #[test]
    fn every_sample_format_is_redacted() {
        for (secret, around) in SAMPLES {
            let text = sample_text(secret, around);
            let out = redact(&text);
            assert!(!out.contains(secret), "{secret:?} left in {out:?}");
            assert!(out.contains(REDACTED), "{text:?} → {out:?}");
            // The words around it stay.
            let label = around.split("{}").next().unwrap();
            let label = label.trim_end_matches(['\'', '"']);
            assert!(out.contains(label), "{label:?} lost from {out:?}");
        }
    }

    #[test]
    fn slack_webhooks_keep_the_host() {
        assert_eq!(
            redact(
                "post to https://hooks.slack.com/services/T0A1B2C3D/B0E4F5G6H/abcDEF0123ghiJKL4567mnop now"
            ),
            "post to https://hooks.slack.com/services/[redacted] now"
        );
        assert_untouched("see https://hooks.slack.com/services/ for the docs");
    }

    #[test]
    fn npm_tokens_in_npmrc_and_alone() {
        assert_eq!(
            redact("//registry.npmjs.org/:_authToken=npm_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
            "//registry.npmjs.org/:_authToken=[redacted]"
        );
        assert_untouched("npm_config_cache and npm_package_version are set");
    }

    #[test]
    fn sendgrid_twilio_and_azure() {
        assert_eq!(
            redact(
                "SENDGRID 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"
            ),
            "SENDGRID [redacted]"
        );
        assert_eq!(
            redact(
                "key SK0123456789abcdef0123456789abcdef and sid AC0123456789abcdef0123456789abcdef"
            ),
            "key [redacted] and sid [redacted]"
        );
        assert_untouched("SKIPPED ACCOUNTS: 12, ACK");
        assert_eq!(
            redact(
                "AccountName=a;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;EndpointSuffix=x"
            ),
            "AccountName=a;AccountKey=[redacted];EndpointSuffix=x"
        );
        assert_eq!(
            redact("https://a.blob.core.windows.net/c/b?sv=2022&sig=AbCdEf0123456789%2Bxyz&se=1"),
            "https://a.blob.core.windows.net/c/b?sv=2022&sig=[redacted]&se=1"
        );
        assert_eq!(
            redact("AZURE_OPENAI_API_KEY=0123456789abcdef0123456789abcdef"),
            "AZURE_OPENAI_API_KEY=[redacted]"
        );
    }

    #[test]
    fn a_bare_aws_secret_key_next_to_its_key_id() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        for text in [
            format!("AKIAIOSFODNN7EXAMPLE {secret}"),
            format!("AKIAIOSFODNN7EXAMPLE:{secret}"),
            format!("id=AKIAIOSFODNN7EXAMPLE\nsecret is\n{secret}\n"),
            format!("{secret},AKIAIOSFODNN7EXAMPLE"),
        ] {
            let out = redact(&text);
            assert!(
                !out.contains(secret) && !out.contains("AKIAIOSFODNN7EXAMPLE"),
                "{out}"
            );
        }
        // Without a key id nearby, a 40-character token is not presumed to be one.
        assert_untouched(&format!("blob {secret} here"));
        // Git ids are 40 lowercase hex: not one even next to a key id.
        assert_eq!(
            redact("AKIAIOSFODNN7EXAMPLE 3f2a9c1b7d4e5f60718293a4b5c6d7e8f9012345"),
            "[redacted] 3f2a9c1b7d4e5f60718293a4b5c6d7e8f9012345"
        );
    }

    #[test]
    fn high_entropy_tokens_after_key_words() {
        for text in [
            "the token is 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",
            "api key: Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg",
            "X-Signature 5d41402abc4b2a76b9719d911017c592aa",
            "use secret=AbC123dEf456GhI789jKl0",
            "the password is Tr0ub4dor3xKz9Qw2Lm",
        ] {
            let out = redact(text);
            assert!(out.contains(REDACTED), "{text:?} → {out:?}");
        }
        // Words, paths, versions and counts after the same words are not keys.
        assert_untouched("the key insight is simple; keyboard layouts differ");
        assert_untouched("token budget: 4096 tokens, key path src/tasks/engine.rs");
        assert_untouched("the key fix is in tools/fake-realtime/server.rs, version v1.2.3");
        assert_untouched("key: value, the secret sauce");
    }

    #[test]
    fn invisible_characters_do_not_hide_a_key() {
        for breaker in [
            "\u{200B}", "\u{200C}", "\u{200D}", "\u{2060}", "\u{FEFF}", "\u{00AD}",
        ] {
            let text = format!("key sk-proj-Ab3dEfGh1jKl{breaker}MnOpQrStUvWxYz0123456789 ok");
            assert_eq!(redact(&text), "key [redacted] ok", "{breaker:?}");
        }
        // Outside a secret they stay: only the matching leaves them out.
        assert_untouched("family 👨\u{200D}👩\u{200D}👧 and ❤\u{FE0F} — café \u{202E}x\u{200B}y");
        assert_eq!(
            redact("\u{200B}a DB_PASSWORD=hun\u{200B}ter2 \u{200B}b\u{200B}"),
            "\u{200B}a DB_PASSWORD=[redacted] \u{200B}b\u{200B}"
        );
        let mut r = OutputRedactor::new();
        assert_eq!(
            r.redact_piece("\u{202E}x key sk-proj-Ab3dEfGh1jKl\u{200B}MnOpQrStUvWxYz0123456789\n"),
            "\u{202E}x key [redacted]\n"
        );
    }

    #[test]
    fn a_key_broken_by_a_newline_loses_both_halves() {
        let text = "key sk-proj-Ab3dEfGh1jKl\nMnOpQrStUvWxYz0123456789 done";
        assert_eq!(redact(text), "key [redacted]\n[redacted] done");
        let text = "export GITHUB_TOKEN=ghp_16C7e42F292c691\r\n2E7710c838347Ae178B4a\n";
        let out = redact(text);
        assert!(
            !out.contains("ghp_16C7e") && !out.contains("2E7710c8"),
            "{out:?}"
        );
        // The second half elsewhere in the same text goes too.
        let text =
            "sk-proj-Ab3dEfGh1jKl\nMnOpQrStUvWxYz0123456789\nresult: MnOpQrStUvWxYz0123456789";
        assert_eq!(redact(text), "[redacted]\n[redacted]\nresult: [redacted]");
        // Ordinary wrapped lines are not joined into anything.
        assert_untouched(
            "fn main() {\n    println!(\"hello\");\n}\nsome_long_identifier\nanother_identifier_here\n",
        );
    }

    #[test]
    fn a_key_cut_off_at_an_edge_is_redacted() {
        assert_eq!(redact("echo sk-proj-Ab3dEf0…"), "echo [redacted]…");
        assert_eq!(
            redact("token ghp_16C7e42F\nnext line"),
            "token [redacted]\nnext line"
        );
        assert_eq!(redact("last AKIAIOSF0D"), "last [redacted]");
        // A bare prefix, or a word after it, is not a key.
        assert_untouched("use sk-learn\nnpm_config…\nthe hf_hub");
    }

    #[test]
    fn redaction_is_idempotent() {
        for (secret, around) in SAMPLES {
            let once = redact(&sample_text(secret, around));
            assert_eq!(redact(&once), once);
        }
    }

    #[test]
    fn the_output_redactor_joins_pieces_and_remembers_halves() {
        let mut r = OutputRedactor::new();
        // A key split over two stream-json messages, each rendered as a line of its own.
        let first = r.redact_piece("here is the key sk-proj-Ab3dEfGh1jKl\n");
        let second = r.redact_piece("MnOpQrStUvWxYz0123456789 and more\n");
        assert_eq!(first, "here is the key [redacted]\n");
        assert_eq!(second, "[redacted] and more\n");
        // The result line repeats the last message: the half is remembered.
        let third = r.redact_piece("[result] success: MnOpQrStUvWxYz0123456789 and more\n");
        assert_eq!(third, "[result] success: [redacted] and more\n");
        assert_eq!(
            scrub(
                "MnOpQrStUvWxYz0123456789 and more",
                "the key sk-proj-Ab3dEfGh1jKl\nMnOpQrStUvWxYz0123456789 and more\n"
            ),
            "[redacted] and more"
        );
        // An assignment whose value runs over two pieces.
        let mut r = OutputRedactor::new();
        let a = r.redact_piece("aws_secret_access_key = wJalrXUtnFEMI/K7MD\n");
        let b = r.redact_piece("ENG/bPxRfiCYEXAMPLEKEY\n");
        assert!(!a.contains("wJalr") && !b.contains("bPxRf"), "{a:?} {b:?}");
        // A piece that does not end a line continues in the next one.
        let mut r = OutputRedactor::new();
        let a = r.redact_piece("DB_PASSWORD=hunt");
        let b = r.redact_piece("er2 ok\n");
        assert!(!a.contains("hunt") && !b.contains("er2"), "{a:?} {b:?}");
    }

    #[test]
    fn the_output_redactor_covers_a_private_key_over_many_pieces() {
        let mut r = OutputRedactor::new();
        let out = [
            r.redact_piece("writing the key\n-----BEGIN OPENSSH PRIVATE KEY-----\n"),
            r.redact_piece(
                "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n",
            ),
            r.redact_piece(
                "QyNTUxOQAAACDK0123456789abcdef\n-----END OPENSSH PRIVATE KEY-----\nok\n",
            ),
            r.redact_piece("after\n"),
        ];
        let all = out.concat();
        assert!(
            !all.contains("b3BlbnNz") && !all.contains("QyNTUx"),
            "{all:?}"
        );
        assert!(
            all.starts_with("writing the key\n") && all.ends_with("ok\nafter\n"),
            "{all:?}"
        );
    }

    #[test]
    fn a_log_window_redacts_what_its_start_cut_off() {
        // The first half of the key fell before the window.
        assert_eq!(
            redact_log("MnOpQrStUvWxYz0123456789 and more\nnext line\n"),
            "[redacted] and more\nnext line\n"
        );
        // So did the BEGIN line of a private key.
        assert_eq!(
            redact_log(
                "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\nok\n"
            ),
            "[redacted]\nok\n"
        );
        assert_untouched("[session 3a2b]\nReading src/main.rs\n");
        assert_eq!(
            redact_log("=== 2026-01-01T00:00:00Z run 1: fix it\nok\n"),
            "=== 2026-01-01T00:00:00Z run 1: fix it\nok\n"
        );
        // The rest is redacted as usual.
        assert_eq!(
            redact_log("a\nDB_PASSWORD=hunter2\n"),
            "a\nDB_PASSWORD=[redacted]\n"
        );
    }

    #[test]
    fn following_starts_after_what_was_shown() {
        let shown = "line\nthe key sk-proj-Ab3dEfGh1jKl\n";
        let mut r = OutputRedactor::after(shown);
        assert_eq!(
            r.redact_piece("MnOpQrStUvWxYz0123456789 ok\n"),
            "[redacted] ok\n"
        );
    }

    #[test]
    fn the_output_redactor_leaves_ordinary_output_alone() {
        let mut r = OutputRedactor::new();
        let lines = "[session 3a2b]\nReading src/main.rs\n[tool] Bash: cargo test --lib tasks::\n\
                     test result: ok. 42 passed; 0 failed\nsome_identifier_name\nanother_identifier_name\n";
        let mut out = String::new();
        for line in lines.split_inclusive('\n') {
            out.push_str(&r.redact_piece(line));
        }
        assert_eq!(out, lines);
    }

    #[test]
    fn excerpts_redact_first_then_cut() {
        let key = "sk-proj-CZ8hKYWHJPu05MC4jAbCdEfGhIjKlMnOpQrStUvWxYz0123456789xy";
        // Whatever the window, no piece of the key survives the cut.
        for pad in 0..80 {
            let text = format!("{} {key} {}", "a".repeat(pad), "b ".repeat(20));
            for max in [20, 40, 60, 80] {
                for keep in [Keep::Head, Keep::Tail] {
                    let out = excerpt(&text, max, keep);
                    assert!(out.chars().count() <= max, "{out:?}");
                    for piece in key.as_bytes().windows(8) {
                        let piece = std::str::from_utf8(piece).unwrap();
                        assert!(
                            !out.contains(piece),
                            "{piece:?} in {out:?} ({pad}, {max}, {keep:?})"
                        );
                    }
                }
            }
        }
        assert_eq!(excerpt("one two three four", 11, Keep::Tail), "…three four");
        assert_eq!(
            excerpt("one two three four", 100, Keep::Tail),
            "one two three four"
        );
        assert_eq!(excerpt("onetwothreefour", 8, Keep::Tail), "…");
        assert_eq!(excerpt("a9b8c7d6e5f4g3h2i1", 8, Keep::Head), "…");
    }

    #[test]
    fn speech_excerpt_of_the_tail() {
        let text = "# Log\n\nfirst line\n- step **one** done\n- step two done\n";
        assert_eq!(
            speech_excerpt(text, 30, Keep::Tail),
            "…step one done. step two done."
        );
        assert_eq!(
            speech_excerpt(text, 200, Keep::Tail),
            "Log. first line. step one done. step two done."
        );
    }

    /// Not a timing assertion (rt-bench measures speed): prints how fast redaction runs over
    /// a large realistic input, for the record. `cargo test --release --lib redact -- --nocapture`.
    #[test]
    fn redaction_throughput() {
        let mut text = String::new();
        let mut i = 0;
        while text.len() < 4 << 20 {
            text.push_str(&format!(
                "[tool] Bash: cargo test --lib tasks::stream::tests::case_{i} -- --nocapture\n\
                 The parser reads line {i} of src/tasks/stream.rs and the key insight is that \
                 each token is checked once; see https://github.com/o/r/pull/{i}.\n\
                 test result: ok. {i} passed; 0 failed; finished in 0.{i}s\n"
            ));
            i += 1;
        }
        let mut with_secrets = text.clone();
        with_secrets.push_str("DB_PASSWORD=hunter2 sk-proj-Ab3dEfGh1jKlMnOpQrStUvWxYz0123456789\n");
        for (label, input) in [("plain", &text), ("with secrets", &with_secrets)] {
            let start = std::time::Instant::now();
            let out = redact(input);
            let batch = start.elapsed();
            let mut r = OutputRedactor::new();
            let start = std::time::Instant::now();
            let mut streamed = 0;
            for chunk in input.as_bytes().chunks(4096) {
                streamed += r.redact_piece(&String::from_utf8_lossy(chunk)).len();
            }
            let stream = start.elapsed();
            let mb = input.len() as f64 / (1 << 20) as f64;
            eprintln!(
                "redaction, {label}: {mb:.1} MiB in one piece {:.1} ms ({:.0} MiB/s), \
                 in 4 KiB pieces {:.1} ms ({:.0} MiB/s)",
                batch.as_secs_f64() * 1e3,
                mb / batch.as_secs_f64(),
                stream.as_secs_f64() * 1e3,
                mb / stream.as_secs_f64(),
            );
            assert!(out.len() <= input.len() && streamed > 0);
        }
        // What one `ctl logs` or `task_status` costs: the 64 KiB tail, read as a log window.
        let window = last_lines(&text, 64 * 1024);
        let runs = 20;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            assert!(!redact_log(window).is_empty());
        }
        eprintln!(
            "redaction of a 64 KiB tail: {:.2} ms",
            start.elapsed().as_secs_f64() * 1e3 / runs as f64
        );
    }
}
