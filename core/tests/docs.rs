// The documentation is self-contained: every repository path the Markdown
// files name exists, and nothing points at a design document kept outside the
// repository.

use std::path::{Path, PathBuf};

/// Names in backticks that look like paths but are not files of this
/// repository, each with the reason.
const NOT_REPOSITORY_PATHS: &[&str] = &[
    "application/x-www-form-urlencoded", // a media type
    "files.content.read/write",          // Dropbox scopes
    "latchkey-data/master.key",          // where older versions kept the generated key, at run time
    "target/screenshots/",               // written by the browser tests
    "fuzz-0.log",                        // a name libFuzzer would write
    "pagecache/snapshot.rs",             // a file of sled's source
    "latchkey.toml",                     // the configuration file the README has the reader write
];

/// Endings that make a name in backticks a file name even without a `/`.
const FILE_ENDINGS: &[&str] =
    &[".rs", ".md", ".toml", ".sh", ".json", ".txt", ".svg", ".log", ".js", ".css", ".lock", ".yml", ".yaml", ".dict"];

/// Directories that are build output or installed packages, not the repository.
const NOT_REPOSITORY_DIRS: &[&str] = &["target", "node_modules", ".git"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every file and directory of the repository, relative to its root, with `/`.
fn repository_entries(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if NOT_REPOSITORY_DIRS.iter().any(|d| name == *d) {
                continue;
            }
            if let Ok(relative) = path.strip_prefix(root) {
                let parts: Vec<String> =
                    relative.components().map(|c| c.as_os_str().to_string_lossy().into()).collect();
                out.push(parts.join("/"));
            }
            if path.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// The Markdown files the check reads: all of them.
fn markdown_files(entries: &[String]) -> Vec<&str> {
    entries.iter().map(String::as_str).filter(|p| p.ends_with(".md")).collect()
}

/// What a Markdown text names: code spans and link targets, outside fenced blocks.
fn named(text: &str) -> (Vec<String>, Vec<String>) {
    let mut fenced = false;
    let prose: Vec<&str> = text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return "";
            }
            if fenced { "" } else { line }
        })
        .collect();
    let prose = prose.join("\n");
    let (mut code, mut links) = (Vec::new(), Vec::new());
    for (i, part) in prose.split('`').enumerate() {
        if i % 2 == 1 {
            code.push(part.to_owned());
            continue;
        }
        let mut rest = part;
        while let Some(start) = rest.find("](") {
            rest = &rest[start + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            links.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    (code, links)
}

/// The repository path a code span names, if it looks like one: it has a
/// `/` or a file ending, and nothing a path in these docs never has
/// (spaces, URLs, routes, placeholders, Rust paths, options).
fn as_path(span: &str) -> Option<&str> {
    let span = span.trim();
    let span = span.strip_prefix("./").unwrap_or(span);
    if span.is_empty()
        || span.contains("://")
        || span.starts_with(['/', '#', '-', '$'])
        || span.chars().any(|c| c.is_whitespace() || "<>{}*=?&@:…|\"'(),;[]\\".contains(c))
        || NOT_REPOSITORY_PATHS.contains(&span)
    {
        return None;
    }
    (span.contains('/') || FILE_ENDINGS.iter().any(|e| span.ends_with(e))).then_some(span)
}

/// Whether `path` names something in the repository: from the root, from
/// the document's directory, or as the end of a longer path (a file named
/// in a section about its crate: `http/reply.rs`, `token.rs`).
fn exists(path: &str, doc_dir: &str, root: &Path, entries: &[String]) -> bool {
    let path = path.trim_end_matches('/');
    root.join(path).exists()
        || root.join(doc_dir).join(path).exists()
        || entries.iter().any(|e| e.strip_suffix(path).is_some_and(|head| head.ends_with('/')))
}

#[test]
fn every_path_the_docs_name_exists() {
    let root = repo_root();
    let entries = repository_entries(&root);
    let docs = markdown_files(&entries);
    for must in ["README.md", "ARCHITECTURE.md", "docs/protocol.md", "docs/embedding.md", "docs/providers.md"] {
        assert!(docs.contains(&must), "{must} is missing; found {docs:?}");
    }
    let mut checked = Vec::new();
    let mut missing = Vec::new();
    for doc in docs {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        let doc_dir = doc.rsplit_once('/').map_or("", |(dir, _)| dir);
        let (code, links) = named(&text);
        for span in &code {
            if let Some(path) = as_path(span) {
                checked.push((doc, path.to_owned()));
                if !exists(path, doc_dir, &root, &entries) {
                    missing.push(format!("{doc}: `{path}`"));
                }
            }
        }
        for link in &links {
            let target = link.split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked.push((doc, target.to_owned()));
            if !root.join(doc_dir).join(target).exists() {
                missing.push(format!("{doc}: link to {target}"));
            }
        }
    }
    // The check sees what it should: this very test binary, named in ARCHITECTURE.md.
    assert!(checked.contains(&("ARCHITECTURE.md", "core/tests/core.rs".to_owned())), "{checked:?}");
    assert!(missing.is_empty(), "the docs name paths that do not exist:\n{}", missing.join("\n"));
}

#[test]
fn nothing_points_at_a_design_document_outside_the_repository() {
    // Spelled in two halves so this file does not name it.
    let outside = ["DESIGN", "md"].join(".");
    let root = repo_root();
    let naming: Vec<String> = repository_entries(&root)
        .into_iter()
        .filter(|p| [".md", ".rs", ".toml"].iter().any(|e| p.ends_with(e)))
        .filter(|p| std::fs::read(root.join(p)).is_ok_and(|bytes| String::from_utf8_lossy(&bytes).contains(&outside)))
        .collect();
    assert!(
        naming.is_empty(),
        "these name {outside}, which is not in the repository; name docs/protocol.md: {naming:?}"
    );
}

#[test]
fn the_path_filter_tells_paths_from_other_code() {
    for path in [
        "core/tests/core.rs",
        "http/reply.rs",
        "token.rs",
        "benches/",
        "./latchkey-data/x.toml",
        ".config/nextest.toml",
    ] {
        assert!(as_path(path).is_some(), "{path}");
    }
    for other in [
        "/refresh",
        "POST /login",
        "https://example.org/a.md",
        "<public_url>/logged-in",
        "latchkey::audit",
        "sslmode=require",
        "./latchkey-data",
        "--features postgres-tls",
        "files.content.read/write",
        "Files.ReadWrite",
    ] {
        assert!(as_path(other).is_none(), "{other}");
    }
}
