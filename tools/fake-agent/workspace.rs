//! The file tools' real effects in the working directory (Write, Edit), and what the CLI
//! reports about them.
//!
//! walkie records `files_changed` from the tool uses and tests look at the files, so the
//! stand-in really writes them; the reported texts and structured results follow the
//! write/edit fixtures.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// One tool use and its answer, ready to be printed.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub name: &'static str,
    pub input: Value,
    /// The `tool_result` block's text.
    pub content: String,
    pub is_error: bool,
    /// The CLI's structured `tool_use_result`.
    pub structured: Value,
}

impl Exchange {
    /// A failed tool use, reported as the CLI does (`"Error: …"` structured result).
    pub fn failed(name: &'static str, input: Value, message: String) -> Self {
        Exchange {
            name,
            input,
            structured: json!(format!("Error: {message}")),
            content: message,
            is_error: true,
        }
    }
}

/// The smallest `notes-<n>.md` (n ≥ 1) not yet in `dir`, so follow-ups add a new file.
pub fn next_notes_file(dir: &Path) -> PathBuf {
    let mut n = 1u32;
    loop {
        let name = PathBuf::from(format!("notes-{n}.md"));
        if !dir.join(&name).exists() || n == u32::MAX {
            return name;
        }
        n += 1;
    }
}

/// Write `content` to `path` (relative to `cwd`), creating parent directories as the real
/// Write tool does.
pub fn write(cwd: &Path, path: &Path, content: &str) -> Exchange {
    let full = cwd.join(path);
    let shown = full.display().to_string();
    let input = json!({"file_path": shown, "content": content});
    let original = fs::read_to_string(&full).ok();
    let written = full
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(&full, content));
    if let Err(e) = written {
        return Exchange::failed("Write", input, format!("cannot write {shown}: {e}"));
    }
    let (kind, message) = match &original {
        None => (
            "create",
            format!(
                "File created successfully at: {shown} (file state is current in your \
                 context \u{2014} no need to Read it back)"
            ),
        ),
        Some(_) => (
            "update",
            format!("The file {shown} has been updated successfully."),
        ),
    };
    Exchange {
        name: "Write",
        structured: json!({
            "type": kind,
            "filePath": shown,
            "content": content,
            "structuredPatch": [],
            "originalFile": original,
            "userModified": false
        }),
        input,
        content: message,
        is_error: false,
    }
}

/// Whether `path` has a non-empty first line an Edit can replace.
pub fn editable(cwd: &Path, path: &Path) -> bool {
    fs::read_to_string(cwd.join(path)).is_ok_and(|text| !first_line(&text).is_empty())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// Replace the first line of `path` with itself plus a marker, as one Edit tool use.
pub fn edit(cwd: &Path, path: &Path) -> Exchange {
    let full = cwd.join(path);
    let shown = full.display().to_string();
    let edited = fs::read_to_string(&full).and_then(|original| {
        let old = first_line(&original).to_owned();
        if old.is_empty() {
            return Err(io::Error::other("nothing to edit: the first line is empty"));
        }
        let new = format!("{old} (edited by fake-agent)");
        fs::write(&full, original.replacen(&old, &new, 1))?;
        Ok((original, old, new))
    });
    match edited {
        Err(e) => Exchange::failed(
            "Edit",
            json!({"replace_all": false, "file_path": shown, "old_string": "", "new_string": ""}),
            format!("cannot edit {shown}: {e}"),
        ),
        Ok((original, old, new)) => Exchange {
            name: "Edit",
            input: json!({
                "replace_all": false,
                "file_path": shown,
                "old_string": old,
                "new_string": new
            }),
            content: format!(
                "The file {shown} has been updated successfully. (file state is current in \
                 your context \u{2014} no need to Read it back)"
            ),
            is_error: false,
            structured: json!({
                "filePath": shown,
                "oldString": old,
                "newString": new,
                "originalFile": original,
                "structuredPatch": [{
                    "oldStart": 1, "oldLines": 1, "newStart": 1, "newLines": 1,
                    "lines": [format!("-{old}"), format!("+{new}")]
                }],
                "userModified": false,
                "replaceAll": false
            }),
        },
    }
}

/// A Bash tool use that reports `stdout` without running anything.
pub fn bash(command: &str, description: &str, stdout: &str) -> Exchange {
    Exchange {
        name: "Bash",
        input: json!({"command": command, "description": description}),
        content: stdout.to_owned(),
        is_error: false,
        structured: json!({
            "stdout": stdout,
            "stderr": "",
            "interrupted": false,
            "isImage": false,
            "noOutputExpected": false
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_files_are_numbered_from_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_notes_file(dir.path()), PathBuf::from("notes-1.md"));
        fs::write(dir.path().join("notes-1.md"), "x").unwrap();
        assert_eq!(next_notes_file(dir.path()), PathBuf::from("notes-2.md"));
    }

    #[test]
    fn write_creates_then_updates() {
        let dir = tempfile::tempdir().unwrap();
        let first = write(dir.path(), Path::new("sub/a.txt"), "one\n");
        assert!(!first.is_error);
        assert_eq!(first.structured["type"], "create");
        assert_eq!(
            fs::read_to_string(dir.path().join("sub/a.txt")).unwrap(),
            "one\n"
        );
        let full = dir.path().join("sub/a.txt").display().to_string();
        assert_eq!(first.input["file_path"], full);

        let second = write(dir.path(), Path::new("sub/a.txt"), "two\n");
        assert_eq!(second.structured["type"], "update");
        assert_eq!(second.structured["originalFile"], "one\n");
        assert_eq!(
            fs::read_to_string(dir.path().join("sub/a.txt")).unwrap(),
            "two\n"
        );
    }

    #[test]
    fn write_failure_is_a_tool_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("file"), "").unwrap();
        // A path below a regular file cannot be created.
        let ex = write(dir.path(), Path::new("file/below.txt"), "x");
        assert!(ex.is_error);
        assert!(
            ex.structured
                .as_str()
                .is_some_and(|s| s.starts_with("Error: "))
        );
    }

    #[test]
    fn edit_changes_the_first_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = Path::new("b.txt");
        assert!(!editable(dir.path(), path));
        fs::write(dir.path().join(path), "hello\nhello again\n").unwrap();
        assert!(editable(dir.path(), path));
        let ex = edit(dir.path(), path);
        assert!(!ex.is_error, "{ex:?}");
        assert_eq!(ex.input["old_string"], "hello");
        assert_eq!(
            fs::read_to_string(dir.path().join(path)).unwrap(),
            "hello (edited by fake-agent)\nhello again\n"
        );
        assert_eq!(ex.structured["originalFile"], "hello\nhello again\n");
    }

    #[test]
    fn edit_of_a_missing_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let ex = edit(dir.path(), Path::new("nope.txt"));
        assert!(ex.is_error);
        assert!(!dir.path().join("nope.txt").exists());
    }
}
