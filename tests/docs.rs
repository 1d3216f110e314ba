//! The documentation users read stays true: the configuration reference lists every key of
//! `walkie config example` with the same default, and nothing it documents is gone.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

mod common;

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `section.key` → default, from the rows `| `key` | `default` | meaning |` under each
/// `## [section]` heading of docs/CONFIGURATION.md.
fn documented_keys(doc: &str) -> (BTreeMap<String, toml::Value>, Vec<String>) {
    let mut keys = BTreeMap::new();
    let mut sections = Vec::new();
    let mut section: Option<String> = None;
    for (n, line) in doc.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .map(str::to_string);
            sections.extend(section.clone());
            continue;
        }
        let Some(section) = &section else { continue };
        let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
        let [key, default, ..] = cells.as_slice() else {
            continue;
        };
        let Some(key) = key.strip_prefix("| `").and_then(|k| k.strip_suffix('`')) else {
            continue;
        };
        let default = default
            .strip_prefix('`')
            .and_then(|d| d.strip_suffix('`'))
            .unwrap_or_else(|| panic!("CONFIGURATION.md:{}: default of {key} not in `…`", n + 1));
        let value: toml::Table = toml::from_str(&format!("v = {default}")).unwrap_or_else(|e| {
            panic!(
                "CONFIGURATION.md:{}: default of {key} is not TOML: {e}",
                n + 1
            )
        });
        keys.insert(format!("{section}.{key}"), value["v"].clone());
    }
    (keys, sections)
}

#[test]
fn the_configuration_reference_documents_every_key_with_its_default() {
    let out = Command::new(common::WALKIE)
        .args(["config", "example"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let example: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let doc = repo_file("docs/CONFIGURATION.md");
    let (documented, sections) = documented_keys(&doc);
    let mut missing = Vec::new();
    for (section, table) in &example {
        let toml::Value::Table(table) = table else {
            panic!("config example: {section} is not a section");
        };
        assert!(
            sections.contains(section),
            "docs/CONFIGURATION.md has no \"## [{section}]\" heading"
        );
        for (key, default) in table {
            let path = format!("{section}.{key}");
            match documented.get(&path) {
                None => missing.push(format!(
                    "{path} (add a row \"| `{key}` | `{default}` | what it does |\" under ## [{section}])"
                )),
                Some(doc_default) => assert_eq!(
                    doc_default, default,
                    "docs/CONFIGURATION.md gives {path} the default {doc_default}, \
                     `walkie config example` says {default}"
                ),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/CONFIGURATION.md does not document:\n  {}",
        missing.join("\n  ")
    );
    let gone: Vec<_> = documented
        .keys()
        .filter(|path| {
            let (section, key) = path.split_once('.').unwrap();
            example
                .get(section)
                .and_then(|t| t.as_table())
                .is_none_or(|t| !t.contains_key(key))
        })
        .collect();
    assert!(
        gone.is_empty(),
        "docs/CONFIGURATION.md documents keys `walkie config example` does not have: {gone:?}"
    );
}

/// The docs a user reads (README, docs/, --help) stand on their own: no pointer to files
/// outside the repository, and every relative link leads to a file that exists.
#[test]
fn the_code_points_at_the_repositorys_own_docs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" || name == "results" || name.to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                walk(&path, out);
            } else if ["rs", "sh", "py", "toml", "md", "in"]
                .iter()
                .any(|e| path.extension().is_some_and(|x| x == *e))
            {
                out.push(path);
            }
        }
    }
    let mut files = vec![root.join("Cargo.toml"), root.join("Makefile")];
    for dir in ["src", "tests", "tools", "rt-bench"] {
        walk(&root.join(dir), &mut files);
    }
    let this = root.join("tests/docs.rs");
    for file in files.iter().filter(|f| **f != this) {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for outside in ["../shared", "DESIGN.md", "STYLE.md", "shared/fixtures"] {
            assert!(
                !text.contains(outside),
                "{} points outside the repository: {outside}",
                file.display()
            );
        }
    }
}

#[test]
fn the_docs_stand_on_their_own_and_their_links_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        files.push(entry.path());
    }
    for name in [
        "PI.md",
        "TROUBLESHOOTING.md",
        "SECURITY.md",
        "ARCHITECTURE.md",
        "CONFIGURATION.md",
        "COSTS.md",
    ] {
        assert!(
            root.join("docs").join(name).is_file(),
            "docs/{name} is missing"
        );
    }
    assert!(root.join("LICENSE").is_file());
    let mut texts: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.display().to_string(), std::fs::read_to_string(f).unwrap()))
        .collect();
    texts.push((
        "walkie --help texts".into(),
        walkie::help::TOPICS
            .iter()
            .map(|(_, t)| *t)
            .collect::<Vec<_>>()
            .join("\n"),
    ));
    for (file, text) in &texts {
        for outside in [
            "../shared",
            "DESIGN.md",
            "STYLE.md",
            "shared/fixtures",
            "shared/reference",
        ] {
            assert!(
                !text.contains(outside),
                "{file} points outside the repository: {outside}"
            );
        }
    }
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // Markdown links `](target)` that are not URLs or anchors.
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let resolved = file.parent().unwrap().join(target);
            assert!(
                resolved.exists(),
                "{}: the link to {target} leads nowhere",
                file.display()
            );
        }
    }
}
