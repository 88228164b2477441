//! The edge's rooms import each other in one direction only: a test reads the crate's sources,
//! finds every `crate::` path outside the test modules (in `use` lists, in code and in doc
//! links alike), and checks that the graph of top-level modules it draws has no circle, and that
//! the ground floor (`domain`) imports nothing of the crate.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Every source file of the crate (the fuzz crate aside), by its module path.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("the crate's directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "fuzz") {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root, &mut files);
    files
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(&root).expect("under the root");
            let mut parts: Vec<String> = relative
                .with_extension("")
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = if parts == ["lib"] {
                "crate".to_owned()
            } else {
                parts.join("::")
            };
            let text = std::fs::read_to_string(&path).expect("a readable source");
            // What the tests of a module import is not the module's.
            let text = match text.find("#[cfg(test)]\nmod tests") {
                Some(at) => text[..at].to_owned(),
                None => text,
            };
            (name, text)
        })
        .collect()
}

/// The paths after `crate::` in `text`, grouped imports (`crate::{a::B, c}`) expanded.
fn crate_paths(text: &str) -> Vec<String> {
    fn expand(prefix: &str, list: &str, out: &mut Vec<String>) {
        let (mut depth, mut item) = (0, String::new());
        let mut items = Vec::new();
        for c in list.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(std::mem::take(&mut item));
                    continue;
                }
                _ => {}
            }
            item.push(c);
        }
        items.push(item);
        for item in items {
            let item = item.trim();
            let (head, nested) = match item.find("::{") {
                Some(at) => (&item[..at], Some(&item[at + 3..item.len() - 1])),
                None => (item, None),
            };
            let path = if prefix.is_empty() {
                head.to_owned()
            } else {
                format!("{prefix}::{head}")
            };
            match nested {
                Some(nested) => expand(&path, nested, out),
                None if !head.is_empty() => out.push(path),
                None => {}
            }
        }
    }
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            let (mut depth, mut end) = (1, 0);
            for (i, c) in list.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            expand("", &list[..end], &mut out);
        } else {
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(path.trim_end_matches(':').to_owned());
        }
    }
    out
}

/// Which top-level modules each top-level module imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_owned();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, text) in &modules {
        let from = top(name);
        for path in crate_paths(text) {
            let parts: Vec<&str> = path.split("::").collect();
            let target = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|candidate| modules.contains_key(candidate));
            if let Some(target) = target {
                let to = top(&target);
                if to != from && to != "crate" {
                    graph.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
    graph
}

/// A circle of the graph, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_module_graph_has_no_circle() {
    let graph = graph();
    if let Some(circle) = circle(&graph) {
        panic!(
            "the edge's modules import each other in a circle: {}",
            circle.join(" -> ")
        );
    }
    assert!(
        graph.get("domain").is_none_or(BTreeSet::is_empty),
        "the ground floor imports {:?}",
        graph["domain"]
    );
    // The check sees what it should: the handshake imports the registry, the registry the
    // domain.
    assert!(graph["handshake"].contains("registry"), "{graph:?}");
    assert!(graph["registry"].contains("domain"), "{graph:?}");
}

#[test]
fn grouped_imports_are_read() {
    let paths = crate_paths("use crate::{a::{B, c::D}, e};\n/// [`X`](crate::f::X)\n");
    assert_eq!(paths, ["a::B", "a::c::D", "e", "f::X"]);
}
