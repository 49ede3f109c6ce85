//! The workspace's structure, checked: no module of a host crate imports, directly
//! or through others, a module that imports it back; and the core and model crates
//! build without the sandbox, the server, the database, the plots or the command
//! line in their dependency tree. (Cargo itself forbids cycles between crates.)
//!
//! Module dependencies are read from the source the way `cargo modules` reads
//! them: a path through `crate::`, `super::` or a child module's name names the
//! module it reaches (a `pub use` re-export is followed to the module that defines
//! the item). A method called on a type defined elsewhere is no dependency of the
//! caller's module on the callee's, so a type's `impl` blocks may live in the
//! modules of their jobs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// This workspace, or the checkout `KFRAME_LAYERING_WORKSPACE` names (to list
/// another tree's cycles).
fn workspace() -> PathBuf {
    match std::env::var_os("KFRAME_LAYERING_WORKSPACE") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap(),
    }
}

fn host_crates() -> Vec<PathBuf> {
    let mut crates: Vec<PathBuf> = std::fs::read_dir(workspace().join("host"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("src").is_dir())
        .collect();
    crates.sort();
    crates
}

/// A module's path inside its crate: "" for the root, "a::b" for src/a/b.rs.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source with comments, string and char literals blanked out.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &src[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').map_or(b.len(), |n| i + n);
            i = end;
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |n| n + 2);
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].bytes().take_while(|&c| c == b'#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            i += body + rest[body..].find(&close).map_or(rest.len() - body, |n| n + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && (rest.len() > 2 && (rest.as_bytes()[2] == b'\'' || rest.as_bytes()[1] == b'\\')) {
            // A char literal ('x' or '\n'), not a lifetime.
            let j = rest[1..].find('\'').map_or(rest.len(), |n| n + 2);
            i += j;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn ident_at(s: &str, at: usize) -> (&str, usize) {
    let end = s[at..].find(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(s.len(), |n| at + n);
    (&s[at..end], end)
}

/// The paths of a `use`-style tree starting at `at` (after a `::`): `a::b`,
/// `{a, b::{c, d}}`, `*`. Returns each path's segments and where the tree ends.
fn tree_at(s: &str, at: usize) -> (Vec<Vec<String>>, usize) {
    let t = s[at..].trim_start();
    let at = s.len() - t.len();
    if t.starts_with('{') {
        let mut paths = Vec::new();
        let mut i = at + 1;
        loop {
            let rest = s[i..].trim_start();
            i = s.len() - rest.len();
            if rest.starts_with('}') {
                return (paths, i + 1);
            }
            if rest.starts_with(',') {
                i += 1;
                continue;
            }
            let (sub, end) = tree_at(s, i);
            paths.extend(sub);
            i = end;
            // Skip `as name`.
            let rest = s[i..].trim_start();
            if let Some(r) = rest.strip_prefix("as ") {
                let (_, end) = ident_at(s, s.len() - r.trim_start().len());
                i = end;
            }
        }
    }
    let (id, end) = ident_at(s, at);
    if id.is_empty() {
        return (vec![vec![]], at + t.len().min(1));
    }
    if s[end..].starts_with("::") {
        let (subs, end) = tree_at(s, end + 2);
        return (subs.into_iter().map(|p| std::iter::once(id.to_owned()).chain(p).collect()).collect(), end);
    }
    (vec![vec![id.to_owned()]], end)
}

struct Crate {
    modules: BTreeSet<String>,
    code: BTreeMap<String, String>,
    /// module -> item name -> the module path of the `pub use` that re-exports it
    reexports: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

fn parent(m: &str) -> String {
    m.rsplit_once("::").map_or(String::new(), |(p, _)| p.to_owned())
}

fn join(base: &str, seg: &str) -> String {
    if base.is_empty() {
        seg.to_owned()
    } else {
        format!("{base}::{seg}")
    }
}

impl Crate {
    fn load(dir: &Path) -> Self {
        let src = dir.join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut code = BTreeMap::new();
        for f in &files {
            code.insert(module_of(&src, f), code_only(&std::fs::read_to_string(f).unwrap()));
        }
        let modules = code.keys().cloned().collect();
        let mut c = Self { modules, code, reexports: BTreeMap::new() };
        for (m, text) in &c.code {
            let mut map = BTreeMap::new();
            for (at, _) in text.match_indices("pub use ") {
                for path in tree_at(text, at + 8).0 {
                    if let Some(item) = path.last() {
                        map.insert(item.clone(), path.clone());
                    }
                }
            }
            c.reexports.insert(m.clone(), map);
        }
        c
    }

    /// The module `path` reaches from `base`, following re-exports.
    fn resolve(&self, base: &str, path: &[String], depth: usize) -> String {
        let mut m = base.to_owned();
        for (i, seg) in path.iter().enumerate() {
            match seg.as_str() {
                "self" => continue,
                "super" => {
                    m = parent(&m);
                    continue;
                }
                "crate" => {
                    m.clear();
                    continue;
                }
                _ => {}
            }
            let child = join(&m, seg);
            if self.modules.contains(&child) {
                m = child;
                continue;
            }
            // An item of `m`: defined there, or re-exported from elsewhere.
            if let Some(target) = self.reexports.get(&m).and_then(|r| r.get(seg)) {
                if depth < 8 && target.len() > 1 && i + 1 == path.len() {
                    return self.resolve(&m, &target[..target.len() - 1], depth + 1);
                }
            }
            return m;
        }
        m
    }

    /// The modules each module's paths reach.
    fn edges(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (m, text) in &self.code {
            let mut out = BTreeSet::new();
            let children: Vec<String> =
                self.modules.iter().filter(|c| parent(c) == *m && !c.is_empty() && *c != m).cloned().collect();
            let bytes = text.as_bytes();
            let mut inline_depth = Vec::<usize>::new();
            let mut depth = 0usize;
            let mut i = 0;
            while i < text.len() {
                let boundary =
                    i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':');
                match bytes[i] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth = depth.saturating_sub(1);
                        if inline_depth.last() == Some(&depth) {
                            inline_depth.pop();
                        }
                    }
                    _ => {}
                }
                if boundary && text[i..].starts_with("mod ") {
                    let (_, end) = ident_at(text, i + 4);
                    if text[end..].trim_start().starts_with('{') {
                        inline_depth.push(depth);
                    }
                }
                let (id, end) = if boundary { ident_at(text, i) } else { ("", i) };
                let relative = children.iter().any(|c| c.rsplit("::").next() == Some(id));
                if (id == "crate" || id == "super" || relative) && text[end..].starts_with("::") {
                    let (paths, after) = tree_at(text, end + 2);
                    for p in paths {
                        let mut full = vec![id.to_owned()];
                        full.extend(p);
                        // `super` inside an inline module (tests) climbs back to this file first.
                        let skip = full.iter().take_while(|s| *s == "super").count().min(inline_depth.len());
                        let target = self.resolve(m, &full[skip..], 0);
                        if &target != m {
                            out.insert(target);
                        }
                    }
                    i = after.max(i + 1);
                    continue;
                }
                i += text[i..].chars().next().map_or(1, char::len_utf8);
            }
            edges.insert(m.clone(), out);
        }
        edges
    }
}

/// Every cycle of the graph, as its strongly connected components of two or more.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: finish order on the graph, then components on its transpose.
    fn visit(n: &str, e: &BTreeMap<String, BTreeSet<String>>, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(n.to_owned()) {
            return;
        }
        for m in e.get(n).into_iter().flatten() {
            visit(m, e, seen, order);
        }
        order.push(n.to_owned());
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for n in edges.keys() {
        visit(n, edges, &mut seen, &mut order);
    }
    let mut transpose: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, bs) in edges {
        for b in bs {
            transpose.entry(b.clone()).or_default().insert(a.clone());
        }
    }
    let mut assigned = BTreeSet::new();
    let mut out = Vec::new();
    for n in order.iter().rev() {
        let mut component = Vec::new();
        visit(n, &transpose, &mut assigned, &mut component);
        if component.len() > 1 {
            component.sort();
            out.push(component);
        }
    }
    out
}

#[test]
fn no_module_of_any_host_crate_imports_a_module_that_imports_it_back() {
    let mut found = Vec::new();
    for dir in host_crates() {
        let krate = Crate::load(&dir);
        assert!(krate.modules.len() > 1 || dir.ends_with("entries"), "{}: no modules read", dir.display());
        for cycle in cycles(&krate.edges()) {
            let names: Vec<String> =
                cycle.iter().map(|m| if m.is_empty() { "(crate root)".to_owned() } else { m.clone() }).collect();
            found.push(format!("{}: {}", dir.file_name().unwrap().to_string_lossy(), names.join(" <-> ")));
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

/// The checker finds a cycle where there is one (and none in a chain).
#[test]
fn the_module_checker_sees_a_cycle_through_a_reexport_and_a_super_path() {
    let mut krate = Crate { modules: BTreeSet::new(), code: BTreeMap::new(), reexports: BTreeMap::new() };
    for (m, src) in [
        ("", "mod a;\nmod b;\npub use b::Thing;\n"),
        ("a", "use crate::Thing;\nfn f() {}\n"),
        ("b", "pub struct Thing;\nfn g() { super::a::f() }\n"),
    ] {
        krate.modules.insert(m.to_owned());
        krate.code.insert(m.to_owned(), code_only(src));
    }
    krate.reexports.insert(String::new(), [("Thing".to_owned(), vec!["b".to_owned(), "Thing".to_owned()])].into());
    let edges = krate.edges();
    assert_eq!(edges["a"], ["b".to_owned()].into(), "a reaches Thing in b through the root's re-export");
    assert_eq!(cycles(&edges), vec![vec!["a".to_owned(), "b".to_owned()]]);
    krate.code.insert("b".into(), code_only("pub struct Thing; // super::a::f()\nfn g() {}\n"));
    assert!(cycles(&krate.edges()).is_empty(), "a path in a comment is no dependency");
}

/// The crates' normal (not dev) dependency tree, as `cargo tree` prints it.
fn dependency_tree(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none", "-p", package])
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn core_and_model_build_without_wasmtime_hyper_redb_plotters_or_clap() {
    for package in ["kframe-core", "kframe-model"] {
        let tree = dependency_tree(package);
        let crates: BTreeSet<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
        assert!(crates.contains("candle-core"), "{package}: {tree}");
        for banned in ["wasmtime", "hyper", "redb", "plotters", "clap"] {
            assert!(!crates.contains(banned), "{package} depends on {banned}:\n{tree}");
        }
    }
    // The policy runtime knows nothing of candle.
    let tree = dependency_tree("kframe-policy");
    assert!(!tree.lines().any(|l| l.starts_with("candle")), "kframe-policy depends on candle:\n{tree}");
}
