//! Task names: short, speakable, unique kebab-case handles (`flaky-test`) that the user and
//! the model say aloud, and the resolution of a spoken reference ("the flaky one") back to
//! a name. Pure functions over strings; no fd, no thread, no registry of its own (the
//! caller passes what is taken).

/// Longest derived name, in bytes (ASCII, so also in chars).
const MAX_NAME: usize = 32;
/// A prompt gives at most this many words to its name.
const MAX_WORDS: usize = 3;

/// Politeness and framing that open a request ("could you please go ahead and …").
const FILLER: &[&str] = &[
    "please", "pls", "could", "can", "would", "will", "you", "u", "i", "we", "want", "wanna",
    "need", "like", "lets", "let", "us", "me", "go", "ahead", "just", "hey", "hi", "hello", "ok",
    "okay", "now", "quickly", "kindly", "id", "im", "ill", "try", "help", "start", "new", "task",
    "job", "agent", "claude", "maybe", "also", "then",
];

/// Verbs that open a request; dropped only at the start ("fix the build" → "build").
const LEADING_VERBS: &[&str] = &[
    "fix",
    "fixes",
    "fixing",
    "add",
    "adds",
    "adding",
    "make",
    "create",
    "write",
    "implement",
    "update",
    "refactor",
    "remove",
    "delete",
    "investigate",
    "debug",
    "check",
    "look",
    "find",
    "build",
    "run",
    "review",
    "clean",
    "cleanup",
    "improve",
    "change",
    "rename",
    "move",
    "convert",
    "migrate",
    "optimize",
    "optimise",
    "speed",
    "set",
    "setup",
    "install",
    "upgrade",
    "bump",
    "document",
    "explain",
    "figure",
    "research",
    "analyze",
    "analyse",
    "port",
    "rewrite",
    "replace",
    "generate",
    "draft",
    "prepare",
    "finish",
    "continue",
    "get",
    "put",
    "see",
    "do",
    "handle",
    "resolve",
    "address",
    "tidy",
    "sort",
    "summarize",
    "summarise",
];

/// Words that carry no meaning in a name, wherever they are.
const STOP: &[&str] = &[
    "a",
    "an",
    "the",
    "this",
    "these",
    "those",
    "my",
    "our",
    "your",
    "their",
    "its",
    "his",
    "her",
    "some",
    "any",
    "all",
    "every",
    "each",
    "it",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "am",
    "does",
    "did",
    "has",
    "have",
    "had",
    "there",
    "here",
    "up",
    "out",
    "very",
    "really",
    "just",
    "please",
    "so",
    "again",
    "currently",
    "thing",
    "things",
    "stuff",
];

/// Words that end the noun phrase a name is made of ("the flaky test | in CI").
const BOUNDARY: &[&str] = &[
    "in", "on", "at", "to", "for", "from", "with", "without", "into", "onto", "of", "about", "by",
    "via", "under", "over", "after", "before", "during", "because", "since", "when", "where",
    "why", "how", "what", "which", "who", "that", "and", "or", "but", "if", "while", "until",
    "than", "as", "using", "so",
];

/// Words a spoken reference may add around a name ("the flaky one", "the build task").
const REFERENCE_EXTRA: &[&str] = &["one", "ones", "task", "tasks", "job", "jobs", "agent"];

const NUMBERS: [(&str, &str); 10] = [
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// Kebab-case, lowercase ASCII: given name sanitised, else derived from the prompt
/// (drop filler/stop words and leading verbs like fix/add/make/please/could you…; keep the
/// first 2–3 meaningful words; ≤ 32 chars; "task" when nothing is left); unique against `taken`
/// by suffix -2, -3, …  e.g. "Please fix the flaky test in CI" → "flaky-test".
pub fn derive_name(given: Option<&str>, prompt: &str, taken: &dyn Fn(&str) -> bool) -> String {
    let from_given = given.map(sanitize).filter(|name| !name.is_empty());
    let base = from_given.unwrap_or_else(|| sanitize(&name_words(prompt).join(" ")));
    let base = if base.is_empty() {
        "task".to_owned()
    } else {
        fit(&base, MAX_NAME).to_owned()
    };
    if !taken(&base) {
        return base;
    }
    // The registry is finite, so a free suffix exists; the bound only guards against a
    // `taken` that never says no.
    let mut candidate = String::new();
    for n in 2..=100_000u32 {
        let suffix = format!("-{n}");
        candidate = format!("{}{suffix}", fit(&base, MAX_NAME - suffix.len()));
        if !taken(&candidate) {
            break;
        }
    }
    candidate
}

/// The meaningful words of a request: leading filler and one leading verb dropped, stop
/// words skipped, up to the first boundary word (or beyond it when only one word came
/// before), at most three.
fn name_words(prompt: &str) -> Vec<String> {
    let tokens = words(prompt);
    let mut rest = tokens.iter().map(String::as_str).peekable();
    let mut verb_dropped = false;
    while let Some(&token) = rest.peek() {
        if FILLER.contains(&token) || STOP.contains(&token) || BOUNDARY.contains(&token) {
            rest.next();
        } else if !verb_dropped && LEADING_VERBS.contains(&token) {
            verb_dropped = true;
            rest.next();
        } else {
            break;
        }
    }
    let mut kept: Vec<String> = Vec::new();
    let mut crossed_boundary = false;
    for token in rest {
        if BOUNDARY.contains(&token) {
            if kept.len() >= 2 {
                break;
            }
            crossed_boundary = true;
            continue;
        }
        if STOP.contains(&token) {
            continue;
        }
        kept.push(token.to_owned());
        // After a boundary a second word is only there to tell names apart.
        if kept.len() == MAX_WORDS || (crossed_boundary && kept.len() == 2) {
            break;
        }
    }
    kept
}

/// `name` cut to `max` bytes at a '-' when it has one in range, trailing '-' removed.
fn fit(name: &str, max: usize) -> &str {
    if name.len() <= max {
        return name;
    }
    let head = &name[..max];
    let cut = if name.as_bytes()[max] == b'-' {
        head
    } else {
        match head.rfind('-') {
            Some(at) if at > 0 => &head[..at],
            _ => head,
        }
    };
    cut.trim_end_matches('-')
}

/// "Flaky Test!" → "flaky-test"; spelled numbers one..ten → digits ("flaky test two" →
/// "flaky-test-2"); accents folded ("Café" → "cafe"); apostrophes join ("don't" → "dont").
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, word) in words(s).iter().enumerate() {
        if i > 0 {
            out.push('-');
            // Spoken numbers name the -2, -3 suffixes; a leading word ("one", "ten") is a
            // name of its own and stays a word.
            out.push_str(number(word));
        } else {
            out.push_str(word);
        }
    }
    out
}

/// Lowercase ASCII alphanumeric words of `s`.
fn words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    for c in s.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else if matches!(c, '\'' | '’' | 'ʼ') {
            // Inside a word: "let's" is one word.
        } else if let Some(folded) = fold_accent(c) {
            word.push_str(folded);
        } else if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

fn number(word: &str) -> &str {
    NUMBERS
        .iter()
        .find(|(spelled, _)| *spelled == word)
        .map_or(word, |(_, digits)| digits)
}

/// Latin letters with diacritics as their ASCII base, so a name stays speakable and typable.
fn fold_accent(c: char) -> Option<&'static str> {
    Some(match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ą' => "a",
        'æ' => "ae",
        'ç' | 'ć' | 'č' => "c",
        'ď' | 'đ' | 'ð' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ę' | 'ě' => "e",
        'ì' | 'í' | 'î' | 'ï' | 'ī' | 'ı' => "i",
        'ł' => "l",
        'ñ' | 'ń' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => "o",
        'œ' => "oe",
        'ř' => "r",
        'ś' | 'š' => "s",
        'ß' => "ss",
        'ť' | 'þ' => "t",
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' => "u",
        'ý' | 'ÿ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Found(String),
    Ambiguous(Vec<String>),
    NotFound,
}

/// exact name (after sanitize) → unique prefix → word match (every word of the reference is a
/// word of the name, or a prefix of one); several candidates → Ambiguous (sorted).
///
/// Stop words ("the", "that") are ignored in the reference, and so are "one"/"task"/"job"
/// when the rest alone is needed to match ("the flaky one" finds `flaky-test`, while "flaky
/// test one" still finds `flaky-test-1` exactly). A trailing plural "s" is forgiven.
pub fn resolve<'a>(reference: &str, names: impl IntoIterator<Item = &'a str>) -> Resolution {
    let mut names: Vec<(&str, String)> = names
        .into_iter()
        .map(|name| (name, sanitize(name)))
        .collect();
    names.sort_unstable();
    names.dedup_by(|a, b| a.0 == b.0);

    let tokens = words(reference);
    let core: Vec<&str> = tokens
        .iter()
        .map(String::as_str)
        .filter(|t| !STOP.contains(t) && !BOUNDARY.contains(t))
        .collect();
    let required: Vec<&str> = core
        .iter()
        .copied()
        .filter(|t| !REFERENCE_EXTRA.contains(t))
        .collect();
    let join = |words: &[&str]| {
        words
            .iter()
            .map(|w| number(w))
            .collect::<Vec<_>>()
            .join("-")
    };
    let full = sanitize(reference);
    let mut variants: Vec<String> = Vec::new();
    for variant in [full, join(&core), join(&required)] {
        if !variant.is_empty() && !variants.contains(&variant) {
            variants.push(variant);
        }
    }
    if variants.is_empty() {
        return Resolution::NotFound;
    }

    for variant in &variants {
        if let Some((name, _)) = names.iter().find(|(_, clean)| clean == variant) {
            return Resolution::Found((*name).to_owned());
        }
    }
    for variant in &variants {
        let found = candidates(&names, |clean| is_prefix(variant, clean));
        if let Some(resolution) = found {
            return resolution;
        }
    }
    for words in [&core, &required] {
        if words.is_empty() {
            continue;
        }
        let found = candidates(&names, |clean| {
            words.iter().all(|&word| {
                let word = number(word);
                let singular = word.strip_suffix('s').filter(|w| w.len() >= 3);
                clean
                    .split('-')
                    .any(|part| is_prefix(word, part) || singular.is_some_and(|s| part == s))
            })
        });
        if let Some(resolution) = found {
            return resolution;
        }
    }
    Resolution::NotFound
}

/// `prefix` starts `text` without ending inside a number: "task-1" is not a prefix of
/// "task-10".
fn is_prefix(prefix: &str, text: &str) -> bool {
    text.starts_with(prefix)
        && !(prefix.ends_with(|c: char| c.is_ascii_digit())
            && text[prefix.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// Found for one match, Ambiguous (sorted, since `names` is) for several, None for none.
fn candidates(names: &[(&str, String)], matches: impl Fn(&str) -> bool) -> Option<Resolution> {
    let hits: Vec<String> = names
        .iter()
        .filter(|(_, clean)| matches(clean))
        .map(|(name, _)| (*name).to_owned())
        .collect();
    match hits.len() {
        0 => None,
        1 => hits.into_iter().next().map(Resolution::Found),
        _ => Some(Resolution::Ambiguous(hits)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derive(prompt: &str) -> String {
        derive_name(None, prompt, &|_| false)
    }

    #[test]
    fn prompt_examples() {
        let cases = [
            ("Please fix the flaky test in CI", "flaky-test"),
            ("Could you look into the memory leak", "memory-leak"),
            ("Add dark mode to the settings page", "dark-mode"),
            (
                "Refactor the database connection pool for speed",
                "database-connection-pool",
            ),
            ("Fix the build", "build"),
            ("Make the build faster", "build-faster"),
            ("Run the test suite and report failures", "test-suite"),
            ("Write tests for the parser", "tests-parser"),
            ("Help me fix the login page", "login-page"),
            (
                "Hey, can you please go ahead and update README.md?",
                "readme-md",
            ),
            ("I'd like you to speed up the CI pipeline", "ci-pipeline"),
            ("Let's migrate the two old services", "two-old-services"),
        ];
        for (prompt, expected) in cases {
            assert_eq!(derive(prompt), expected, "{prompt}");
        }
    }

    #[test]
    fn nothing_meaningful_gives_task() {
        assert_eq!(derive(""), "task");
        assert_eq!(derive("Please fix it"), "task");
        assert_eq!(derive("!!! ???"), "task");
        assert_eq!(derive_name(Some("  !! "), "", &|_| false), "task");
    }

    #[test]
    fn given_name_wins_and_is_sanitised() {
        assert_eq!(
            derive_name(Some("Flaky Test!"), "Fix the login page", &|_| false),
            "flaky-test"
        );
        // Given words are the user's choice: no stop-word removal.
        assert_eq!(
            derive_name(Some("The Big One"), "x", &|_| false),
            "the-big-1"
        );
        // An unusable given name falls back to the prompt.
        assert_eq!(
            derive_name(Some("…"), "Fix the login page", &|_| false),
            "login-page"
        );
    }

    #[test]
    fn names_are_at_most_32_chars_cut_at_a_word() {
        let name = derive_name(
            Some("an extraordinarily long name for a rather small task"),
            "",
            &|_| false,
        );
        assert_eq!(name, "an-extraordinarily-long-name-for");
        assert!(name.len() <= MAX_NAME);
        let word = derive("Implement supercalifragilisticexpialidociousnessification");
        assert_eq!(word.len(), MAX_NAME);
        let derived = derive("Refactor internationalization configuration loader");
        assert_eq!(derived, "internationalization");
    }

    #[test]
    fn unique_by_suffix() {
        let taken = ["flaky-test", "flaky-test-2"];
        let name = derive_name(None, "fix the flaky test", &|n| taken.contains(&n));
        assert_eq!(name, "flaky-test-3");
        let name = derive_name(Some("build"), "", &|n| n == "build");
        assert_eq!(name, "build-2");
        // The suffix still fits in 32 chars.
        let long = "abcdefghij-abcdefghij-abcdefghij";
        let name = derive_name(Some(long), "", &|n| n == long);
        assert_eq!(name, "abcdefghij-abcdefghij-2");
        assert!(name.len() <= MAX_NAME);
        // A `taken` that never says no still terminates.
        assert!(derive_name(Some("x"), "", &|_| true).starts_with("x-"));
    }

    #[test]
    fn sanitize_rules() {
        assert_eq!(sanitize("Flaky Test!"), "flaky-test");
        assert_eq!(sanitize("flaky test two"), "flaky-test-2");
        assert_eq!(sanitize("Ten Little Bugs"), "ten-little-bugs");
        assert_eq!(sanitize("one"), "one");
        assert_eq!(
            sanitize("  --Mixed__CASE  & punctuation--  "),
            "mixed-case-punctuation"
        );
        assert_eq!(sanitize("Don't Panic"), "dont-panic");
        assert_eq!(sanitize("Café Crème"), "cafe-creme");
        assert_eq!(sanitize("日本語"), "");
        assert_eq!(sanitize("v2 API"), "v2-api");
        // Only whole words are numbers.
        assert_eq!(sanitize("someone tent"), "someone-tent");
    }

    fn found(name: &str) -> Resolution {
        Resolution::Found(name.to_owned())
    }

    fn ambiguous(names: &[&str]) -> Resolution {
        Resolution::Ambiguous(names.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn resolve_exact_with_case_punctuation_and_numbers() {
        let names = ["flaky-test", "flaky-test-2", "build"];
        assert_eq!(resolve("flaky-test", names), found("flaky-test"));
        assert_eq!(resolve("Flaky Test!", names), found("flaky-test"));
        assert_eq!(resolve("flaky test two", names), found("flaky-test-2"));
        assert_eq!(resolve("flaky test 2", names), found("flaky-test-2"));
        assert_eq!(resolve("the build", names), found("build"));
        // Exact beats a longer name it is a prefix of.
        assert_eq!(resolve("build", ["build", "build-2"]), found("build"));
    }

    #[test]
    fn resolve_unique_prefix() {
        let names = ["flaky-test", "login-page", "logging"];
        assert_eq!(resolve("fla", names), found("flaky-test"));
        assert_eq!(resolve("login", names), found("login-page"));
        assert_eq!(resolve("log", names), ambiguous(&["logging", "login-page"]));
    }

    #[test]
    fn numbers_match_whole() {
        let names = ["flaky-test", "flaky-test-10"];
        assert_eq!(resolve("flaky test one", names), found("flaky-test"));
        assert_eq!(resolve("flaky test ten", names), found("flaky-test-10"));
        assert_eq!(resolve("flaky 10", names), found("flaky-test-10"));
        assert_eq!(resolve("flaky 1", names), Resolution::NotFound);
    }

    #[test]
    fn resolve_word_match() {
        let names = ["flaky-test", "login-page", "database-connection-pool"];
        assert_eq!(resolve("test", names), found("flaky-test"));
        assert_eq!(
            resolve("the connection pool", names),
            found("database-connection-pool")
        );
        assert_eq!(
            resolve("conn pool", names),
            found("database-connection-pool")
        );
        assert_eq!(resolve("page", names), found("login-page"));
        assert_eq!(resolve("the flaky tests", names), found("flaky-test"));
        assert_eq!(resolve("pool login", names), Resolution::NotFound);
    }

    #[test]
    fn resolve_the_flaky_one() {
        let names = ["flaky-test", "build-fix"];
        assert_eq!(resolve("the flaky one", names), found("flaky-test"));
        assert_eq!(resolve("that flaky test task", names), found("flaky-test"));
        assert_eq!(resolve("the build job", names), found("build-fix"));
        // "one" is a number when a name has it.
        let numbered = ["flaky-test", "flaky-test-1"];
        assert_eq!(resolve("flaky test one", numbered), found("flaky-test-1"));
        assert_eq!(
            resolve("the flaky one", numbered),
            ambiguous(&["flaky-test", "flaky-test-1"])
        );
    }

    #[test]
    fn resolve_ambiguous_is_sorted() {
        let names = ["unit-test-fix", "flaky-test", "test-data"];
        // "test" is a prefix of test-data only: a unique prefix wins.
        assert_eq!(resolve("test", names), found("test-data"));
        assert_eq!(
            resolve("fix test", ["unit-test-fix", "test-fix-ci", "flaky-test"]),
            ambiguous(&["test-fix-ci", "unit-test-fix"])
        );
        assert_eq!(
            resolve("the flaky one", ["flaky-b", "flaky-a", "flaky-b"]),
            ambiguous(&["flaky-a", "flaky-b"])
        );
    }

    #[test]
    fn resolve_not_found() {
        let names = ["flaky-test"];
        assert_eq!(resolve("database", names), Resolution::NotFound);
        assert_eq!(resolve("", names), Resolution::NotFound);
        assert_eq!(resolve("the one", names), Resolution::NotFound);
        assert_eq!(resolve("flaky", []), Resolution::NotFound);
    }

    #[test]
    fn derived_names_resolve_back() {
        let prompts = [
            "Please fix the flaky test in CI",
            "Add dark mode to the settings page",
            "Fix the flaky test in the parser",
        ];
        let mut names: Vec<String> = Vec::new();
        for prompt in prompts {
            let name = derive_name(None, prompt, &|n| names.iter().any(|t| t == n));
            names.push(name);
        }
        assert_eq!(names, ["flaky-test", "dark-mode", "flaky-test-2"]);
        let refs = || names.iter().map(String::as_str);
        assert_eq!(resolve("dark mode", refs()), found("dark-mode"));
        assert_eq!(resolve("flaky test two", refs()), found("flaky-test-2"));
        assert_eq!(
            resolve("the flaky one", refs()),
            ambiguous(&["flaky-test", "flaky-test-2"])
        );
    }
}
