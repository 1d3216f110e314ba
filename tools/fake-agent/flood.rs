//! Filler text for `@flood` and `@oversize`, and the sizing of flood lines (no IO).
//!
//! walkie must keep its loop responsive while agents print megabytes; the flood has to look
//! like what an agent prints (assistant lines with text blocks of a few KB), and its size must
//! be the one asked for so tests can check bounded logs and byte counts.

/// Text lengths of a flood line when the size is not the limit (a typical reply paragraph).
pub const MIN_TEXT: u64 = 1024;
pub const MAX_TEXT: u64 = 4096;

const WORDS: &[&str] = &[
    "the",
    "test",
    "fails",
    "because",
    "function",
    "returns",
    "early",
    "when",
    "buffer",
    "is",
    "empty",
    "so",
    "I",
    "will",
    "update",
    "parser",
    "to",
    "handle",
    "partial",
    "lines",
    "and",
    "add",
    "a",
    "regression",
    "case",
    "module",
    "config",
    "error",
    "path",
    "value",
    "check",
    "cargo",
    "build",
    "passes",
    "now",
    "next",
    "look",
    "at",
    "scheduler",
    "timeout",
    "retry",
    "socket",
    "closed",
    "while",
    "reading",
    "response",
    "struct",
    "field",
    "renamed",
    "in",
    "commit",
    "review",
    "suggests",
    "splitting",
    "this",
    "into",
    "two",
    "smaller",
    "steps",
];

/// Plain ASCII prose that needs no JSON escaping, so a line's size is its text's size plus
/// a constant.
pub struct Corpus {
    text: String,
}

impl Corpus {
    pub fn new() -> Self {
        let mut text = String::with_capacity(20_000);
        while text.len() < 16_384 {
            let sentence_len = fastrand::usize(6..16);
            for i in 0..sentence_len {
                let word = WORDS[fastrand::usize(..WORDS.len())];
                if i == 0 {
                    let mut chars = word.chars();
                    if let Some(first) = chars.next() {
                        text.push(first.to_ascii_uppercase());
                        text.push_str(chars.as_str());
                    }
                } else {
                    text.push(' ');
                    text.push_str(word);
                }
            }
            text.push_str(". ");
        }
        Corpus { text }
    }

    /// `len` bytes of prose starting at a random place (wrapping around as needed).
    pub fn slice(&self, len: usize) -> String {
        let mut out = String::with_capacity(len);
        let mut pos = fastrand::usize(..self.text.len());
        while out.len() < len {
            let take = (len - out.len()).min(self.text.len() - pos);
            out.push_str(&self.text[pos..pos + take]);
            pos = 0;
        }
        out
    }
}

/// The text length for the next flood line, given the bytes `left` (None: unbounded) and a
/// line's size without its text (`overhead`, newline included). The last line is cut to fit,
/// so the lines total exactly the size asked for whenever it is at least one overhead.
pub fn next_text_len(left: Option<u64>, overhead: u64) -> u64 {
    let random = fastrand::u64(MIN_TEXT..=MAX_TEXT);
    let Some(left) = left else {
        return random;
    };
    if left <= overhead + MAX_TEXT {
        return left.saturating_sub(overhead);
    }
    let after = left - overhead - random;
    if after < overhead + MIN_TEXT {
        // Too little would be left for a last line of normal size: leave exactly that.
        left.saturating_sub(2 * overhead + MIN_TEXT)
    } else {
        random
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_needs_no_escaping() {
        let corpus = Corpus::new();
        let text = corpus.slice(50_000);
        assert_eq!(text.len(), 50_000);
        let json = serde_json::to_string(&text).unwrap();
        assert_eq!(
            json.len(),
            text.len() + 2,
            "no byte of the prose is escaped"
        );
    }

    #[test]
    fn flood_lines_add_up_to_the_size() {
        for size in [
            450u64,
            451,
            1000,
            4600,
            5000,
            6000,
            10_000,
            512 * 1024,
            3 << 20,
        ] {
            let overhead = 450;
            let mut left = size;
            let mut lines = 0;
            while left > 0 {
                let text = next_text_len(Some(left), overhead);
                assert!(text <= MAX_TEXT, "size {size}: text {text}");
                left -= overhead + text;
                lines += 1;
            }
            assert!(lines >= 1);
            if size > 2 * (overhead + MIN_TEXT) {
                assert!(lines >= 2, "size {size}");
            }
        }
    }

    #[test]
    fn unbounded_flood_uses_paragraph_sizes() {
        for _ in 0..100 {
            let len = next_text_len(None, 450);
            assert!((MIN_TEXT..=MAX_TEXT).contains(&len));
        }
    }
}
