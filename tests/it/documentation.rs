//! The documentation cannot drift from the code. In `README.md`, `CONTRIBUTING.md`,
//! `SECURITY.md` and `docs/*.md`:
//! - every ```` ```toml ```` block names only real config keys with the right types (a
//!   fragment is fine), and every ```` ```toml policy ```` block parses as a policy;
//! - every ```` ```sh dev ```` block runs, unchanged, with `bash -euo pipefail` against a dev
//!   daemon, from the directory holding its `.wrapd-dev`, with `wrapctl` on `PATH`;
//! - every relative link points at a file that exists, and the README stays a door (at most
//!   200 lines) that links every page of `docs/`.
//!
//! And the project cites no issue, work-period or review-finding numbers anywhere: a comment
//! says why the code is as it is, a test name what it proves, and the history lives in git.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::DevDaemon;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The documents, README first.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    let mut all: Vec<PathBuf> = ["README.md", "CONTRIBUTING.md", "SECURITY.md"]
        .iter()
        .map(|name| root().join(name))
        .filter(|path| path.exists())
        .collect();
    all.extend(docs);
    all
}

/// A fenced block: where it is, its info string, its text.
struct Block {
    place: String,
    info: String,
    text: String,
}

fn blocks(path: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.strip_prefix(root()).unwrap().display().to_string();
    let mut found = Vec::new();
    let mut open: Option<(usize, String, usize, Vec<String>)> = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    open = Some((index + 1, info.trim().to_owned(), indent, Vec::new()));
                }
            }
            Some((start, info, indent, lines)) => {
                if trimmed.starts_with("```") {
                    found.push(Block {
                        place: format!("{name}:{start}"),
                        info: std::mem::take(info),
                        text: lines.join("\n"),
                    });
                    open = None;
                } else {
                    let cut = line.len() - line.trim_start().len();
                    lines.push(line[cut.min(*indent)..].to_owned());
                }
            }
        }
    }
    assert!(open.is_none(), "{name}: a code fence is never closed");
    found
}

fn all_blocks() -> Vec<Block> {
    documents().iter().flat_map(|path| blocks(path)).collect()
}

#[test]
fn every_config_snippet_in_the_docs_names_real_keys() {
    let mut checked = 0;
    for block in all_blocks().iter().filter(|b| b.info == "toml") {
        if let Err(err) = wrapd::config::Config::check_keys(&block.text) {
            panic!("{}: {err}\n{}", block.place, block.text);
        }
        checked += 1;
    }
    assert!(checked > 5, "only {checked} config snippets found");
}

#[test]
fn every_policy_snippet_in_the_docs_parses() {
    let mut checked = 0;
    for block in all_blocks().iter().filter(|b| b.info == "toml policy") {
        if let Err(err) = wrapd::auth::Policy::parse(&block.text) {
            panic!("{}: {err}\n{}", block.place, block.text);
        }
        checked += 1;
    }
    assert!(checked > 0, "no policy snippet found");
}

#[test]
fn every_runnable_shell_snippet_in_the_docs_runs_against_a_dev_daemon() {
    let runnable: Vec<Block> = all_blocks()
        .into_iter()
        .filter(|b| b.info == "sh dev")
        .collect();
    assert!(
        runnable.len() > 2,
        "only {} runnable snippets",
        runnable.len()
    );
    let daemon = DevDaemon::start();
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(daemon.dir(), home.path().join(".wrapd-dev")).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_wrapctl")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    for block in &runnable {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &block.text])
            .current_dir(home.path())
            .env("PATH", &path)
            .env("WRAPD_SOCKET", &daemon.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} failed:\n{}\n--- stdout\n{}\n--- stderr\n{}",
            block.place,
            block.text,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
}

#[test]
fn every_relative_link_in_the_docs_points_at_a_file() {
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (_, rest) in text.match_indices("](").map(|(i, _)| ((), &text[i + 2..])) {
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let file = target.split('#').next().unwrap();
            let resolved = doc.parent().unwrap().join(file);
            assert!(
                resolved.exists(),
                "{}: link to {target} points at nothing",
                doc.display()
            );
        }
    }
}

#[test]
fn the_readme_is_short_and_links_every_page_of_the_docs() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= 200, "README.md has {lines} lines");
    for doc in documents()
        .iter()
        .filter(|d| d.starts_with(root().join("docs")))
    {
        let name = doc.strip_prefix(root()).unwrap().display().to_string();
        assert!(readme.contains(&name), "README.md does not link {name}");
    }
}

/// The words that, followed by a number, cite the project's history instead of saying why.
fn citation_words() -> [String; 4] {
    // Assembled, so that this file does not cite itself.
    ["iss", "fin", "sess", "work per"].map(|stem| match stem {
        "iss" => format!("{stem}ue"),
        "fin" => format!("{stem}ding"),
        "sess" => format!("{stem}ion"),
        _ => format!("{stem}iod"),
    })
}

/// `text` cites a word of [`citation_words`] followed by a number (`word 15`, `word #15`,
/// `words 15 and 16`).
fn cites_a_number(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    for word in citation_words() {
        for (at, _) in lower.match_indices(&word) {
            let rest = lower[at + word.len()..].trim_start_matches('s');
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            let rest = rest.strip_prefix('#').unwrap_or(rest);
            if rest.starts_with(|c: char| c.is_ascii_digit()) {
                let end = (at + word.len() + 12).min(lower.len());
                return Some(text[at..end].to_owned());
            }
        }
    }
    None
}

#[test]
fn the_project_cites_no_issue_review_or_session_numbers() {
    let mut stack = vec![root().to_owned()];
    let mut offenders = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                let skipped = ["target", "fixtures", "corpus", "artifacts", "node_modules"];
                if !name.starts_with('.') && !skipped.contains(&name.as_str()) {
                    stack.push(path);
                }
                continue;
            }
            let texts = ["rs", "md", "py", "rb", "sh", "toml", "yaml", "yml", "proto"];
            if !path
                .extension()
                .is_some_and(|e| texts.iter().any(|t| e == *t))
            {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for (index, line) in text.lines().enumerate() {
                if let Some(cited) = cites_a_number(line) {
                    let file = path.strip_prefix(root()).unwrap().display();
                    offenders.push(format!("{file}:{}: {cited}", index + 1));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "{}", offenders.join("\n"));
}

#[test]
fn a_citation_is_found_in_every_form() {
    let [issue, finding, session, _] = citation_words();
    assert!(cites_a_number(&format!("see {issue} 15")).is_some());
    assert!(cites_a_number(&format!("({finding} #3)")).is_some());
    assert!(cites_a_number(&format!("{session}s 7 and 8")).is_some());
    assert!(cites_a_number(&format!("Security review {finding} 12:")).is_some());
    assert!(cites_a_number(&format!("a {session} of the token")).is_none());
}
