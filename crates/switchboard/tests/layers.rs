//! The house rules of `src/`, read from its imports: floors run one way
//! (routes → state → session → broker → leaves), no file imports itself back
//! through others, and the broker speaks no client protocol.
//!
//! Every `crate::…` and `super::…` path in a file is an import of the file
//! it names. An import from a lower floor up to a higher one needs a comment
//! on the line above that starts with `// Upward:` and says why; there may be
//! at most two.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The floor of a file, by where it lives: higher floors may import lower ones.
fn floor(file: &str) -> u8 {
    match file {
        "main.rs" | "lib.rs" | "app.rs" | "cli.rs" | "telemetry.rs" => 6,
        f if f.starts_with("routes/") => 5,
        "state.rs" => 4,
        f if f.starts_with("session/") => 3,
        f if f.starts_with("broker/") => 2,
        _ => 1,
    }
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file a module path (`["session", "registry"]`) names, if it exists.
fn module_file(files: &BTreeSet<String>, parts: &[&str]) -> Option<String> {
    // The longest prefix that is a file: `session::registry::Registry` is in `session/registry.rs`.
    for len in (1..=parts.len()).rev() {
        let stem = parts[..len].join("/");
        for candidate in [format!("{stem}.rs"), format!("{stem}/mod.rs")] {
            if files.contains(&candidate) {
                return Some(candidate);
            }
        }
    }
    None
}

/// The segments after `prefix` in `line` at `at`: `crate::a::b::C` gives `[a, b, C]`.
fn path_after(line: &str, at: usize) -> Vec<&str> {
    let rest = &line[at..];
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
    rest[..end].split("::").filter(|s| !s.is_empty()).collect()
}

/// The code of a file without its `#[cfg(test)]` module (tests may reach anywhere).
fn without_tests(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests").map_or(text, |at| &text[..at])
}

struct Import {
    to: String,
    line: usize,
    justified: bool,
}

fn imports(files: &BTreeSet<String>) -> BTreeMap<String, Vec<Import>> {
    let mut graph = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(Path::new(SRC).join(file)).expect("readable");
        let lines: Vec<&str> = without_tests(&text).lines().collect();
        let dir: Vec<&str> = {
            let mut parts: Vec<&str> = file.split('/').collect();
            parts.pop();
            parts
        };
        let mut out = Vec::new();
        for (n, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let mut targets = Vec::new();
            for (at, _) in code.match_indices("crate::") {
                targets.push(module_file(files, &path_after(code, at + "crate::".len())));
            }
            for (at, _) in code.match_indices("super::") {
                // `super` of `session/x.rs` is `session/`; of `session/mod.rs`, the crate.
                let mut base = dir.clone();
                if file.ends_with("mod.rs") {
                    base.pop();
                }
                let mut parts = base;
                parts.extend(path_after(code, at + "super::".len()));
                targets.push(module_file(files, &parts).or_else(|| {
                    let mut own = dir.clone();
                    if file.ends_with("mod.rs") {
                        own.pop();
                    }
                    module_file(files, &own)
                }));
            }
            let justified = n > 0 && lines[..n].iter().rev().take(3).any(|l| l.trim_start().starts_with("// Upward:"));
            for to in targets.into_iter().flatten() {
                if &to != file {
                    out.push(Import { to, line: n + 1, justified });
                }
            }
        }
        graph.insert(file.clone(), out);
    }
    graph
}

fn all_files() -> BTreeSet<String> {
    let mut paths = Vec::new();
    sources(Path::new(SRC), &mut paths);
    paths
        .iter()
        .map(|p| p.strip_prefix(SRC).expect("under src").to_string_lossy().trim_start_matches('/').to_string())
        .collect()
}

#[test]
fn no_file_imports_itself_back() {
    let files = all_files();
    let graph = imports(&files);
    // Depth-first search for a cycle, reporting the first one found.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, Vec<Import>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for import in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(&import.to, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for file in &files {
        if file == "lib.rs" {
            continue;
        }
        let cycle = visit(file, &graph, &mut Vec::new(), &mut done);
        assert!(cycle.is_none(), "import circle: {}", cycle.unwrap_or_default().join(" → "));
    }
}

#[test]
fn floors_run_one_way() {
    let files = all_files();
    let (mut upward, mut unexplained) = (Vec::new(), Vec::new());
    for (file, imports) in imports(&files) {
        for import in imports.iter().filter(|i| floor(&i.to) > floor(&file)) {
            let edge = format!("{file}:{} → {}", import.line, import.to);
            if !import.justified {
                unexplained.push(edge.clone());
            }
            upward.push(edge);
        }
    }
    assert!(unexplained.is_empty(), "upward imports without a `// Upward:` comment: {unexplained:#?}");
    assert!(upward.len() <= 2, "more than two upward imports: {upward:#?}");
}

#[test]
fn the_broker_knows_no_sessions_and_no_client_events() {
    let files = all_files();
    for (file, imports) in imports(&files) {
        if !file.starts_with("broker/") {
            continue;
        }
        for import in imports {
            assert!(
                !import.to.starts_with("session/") && import.to != "state.rs" && !import.to.starts_with("routes/"),
                "{file}:{} imports {}",
                import.line,
                import.to
            );
        }
        let text = std::fs::read_to_string(Path::new(SRC).join(&file)).expect("readable");
        assert!(!without_tests(&text).contains("ServerEvent"), "{file} builds client events");
    }
}
