//! The layering of `lib.rs`'s map, checked against the source.
//!
//! The layers are read from the "# Layers" list of `src/lib.rs`, so the map
//! and the check cannot disagree. Every `crate::`, `super::` and `self::`
//! path of every file in `src/` is resolved to the module it names, and:
//!
//! - a module imports only from layers below its own, never from another
//!   module of its own layer;
//! - no two modules import each other, directly or round a cycle (a parent
//!   `mod.rs` counts as importing a child it names);
//! - every module `lib.rs` declares is in exactly one layer.
//!
//! Test code is exempt (`#[cfg(test)] mod tests`, and `tests.rs` files): a
//! test may reach across, as the identity tests make certificates with
//! `devpki`. Comments and string literals are skipped.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

type ModPath = Vec<String>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layers of `lib.rs`'s "# Layers" list, lowest first.
fn layers(lib: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut in_section = false;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            continue;
        };
        let doc = doc.trim();
        if let Some(heading) = doc.strip_prefix('#') {
            in_section = heading.trim() == "Layers";
            continue;
        }
        let Some((number, rest)) = doc.split_once(". ") else {
            continue;
        };
        if !in_section || number.parse::<usize>().is_err() {
            continue;
        }
        // The names are the intra-doc links before the first ':'.
        let names = rest.split(':').next().unwrap_or_default();
        out.push(
            names
                .split("[`")
                .skip(1)
                .filter_map(|s| s.split_once("`]").map(|(name, _)| name.to_owned()))
                .collect(),
        );
    }
    out
}

/// The modules `lib.rs` declares.
fn declared(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| l.trim().strip_suffix(';'))
        .filter_map(|l| l.split("mod ").nth(1))
        .filter(|name| !name.contains(' '))
        .map(str::to_owned)
        .collect()
}

/// `text` without comments and without the contents of string and char
/// literals (each replaced by a space, so tokens stay apart).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                i += 1;
            }
            i += 2;
            out.push(' ');
        } else if c == 'r'
            && matches!(next, Some('"' | '#'))
            && !ident(chars.get(i.wrapping_sub(1)))
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            let closes =
                |j: usize| chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#'));
            while j < chars.len() && !closes(j) {
                j += 1;
            }
            i = j + 1 + hashes;
            out.push(' ');
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(' ');
        } else if c == '\'' && char_literal_end(&chars, i).is_some() {
            i = char_literal_end(&chars, i).unwrap_or(i + 1);
            out.push(' ');
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// Where a char literal starting at `i` ends (after its closing quote); `None`
/// for a lifetime.
fn char_literal_end(chars: &[char], i: usize) -> Option<usize> {
    match (chars.get(i + 1), chars.get(i + 2)) {
        (Some('\\'), _) => (i + 3..chars.len().min(i + 12))
            .find(|&j| chars[j] == '\'')
            .map(|j| j + 1),
        (Some(_), Some('\'')) => Some(i + 3),
        _ => None,
    }
}

/// Every path in `code` that starts at `start` (`crate::`, `super::`, ...),
/// with `use` groups expanded: `crate::{a::{b, c}, d}` gives `a::b`, `a::c`
/// and `d`.
fn paths_after(code: &str, start: &str) -> Vec<ModPath> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = code[from..].find(start) {
        let at = from + found;
        from = at + start.len();
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let (paths, _) = parse_tree(&code[from..]);
        out.extend(paths);
    }
    out
}

/// Parses a use tree (`a::b`, `a::{b, c::d}`) at the start of `text`.
fn parse_tree(text: &str) -> (Vec<ModPath>, usize) {
    let mut prefix = ModPath::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    loop {
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if bytes.get(i) == Some(&b'{') {
            i += 1;
            let mut all = Vec::new();
            loop {
                while bytes
                    .get(i)
                    .is_some_and(|b| b.is_ascii_whitespace() || *b == b',')
                {
                    i += 1;
                }
                if bytes.get(i).is_none_or(|b| *b == b'}') {
                    i += 1;
                    break;
                }
                let (inner, used) = parse_tree(&text[i..]);
                if used == 0 {
                    i += 1;
                    continue;
                }
                i += used;
                all.extend(inner.into_iter().map(|p| [prefix.clone(), p].concat()));
            }
            return (all, i);
        }
        let name_len = text[i..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(text.len() - i);
        if name_len == 0 {
            return (vec![prefix], i);
        }
        prefix.push(text[i..i + name_len].to_owned());
        i += name_len;
        if text[i..].starts_with("::") {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// One source file: its module path and the code that counts.
struct File {
    module: ModPath,
    is_mod_rs: bool,
    code: String,
}

fn files(dir: &Path, module: &ModPath, out: &mut Vec<File>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/ is readable")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            files(&path, &[module.clone(), vec![name]].concat(), out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs")
            || name == "tests"
            || (module.is_empty() && matches!(name.as_str(), "lib" | "main" | "layers"))
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("source is readable");
        // Test modules close every file that has one.
        let text = match text.find("#[cfg(test)]\nmod tests {") {
            Some(at) => &text[..at],
            None => &text[..],
        };
        let is_mod_rs = name == "mod";
        let module = if is_mod_rs {
            module.clone()
        } else {
            [module.clone(), vec![name]].concat()
        };
        out.push(File {
            module,
            is_mod_rs,
            code: code_only(text),
        });
    }
}

/// The modules each module imports.
fn imports(files: &[File]) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let known: BTreeSet<ModPath> = files.iter().map(|f| f.module.clone()).collect();
    let resolve = |path: ModPath| -> Option<ModPath> {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|p| known.contains(p))
    };
    let mut graph: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for file in files {
        let here = &file.module;
        // `super` is the parent of a file's module, `self` the module.
        let parent = here[..here.len().saturating_sub(1)].to_vec();
        let mut named: Vec<ModPath> = paths_after(&file.code, "crate::");
        for path in paths_after(&file.code, "super::") {
            named.push([parent.clone(), path].concat());
        }
        for path in paths_after(&file.code, "self::") {
            named.push([here.clone(), path].concat());
        }
        if file.is_mod_rs {
            // A folder's mod.rs may name its children without `self::`.
            for child in known
                .iter()
                .filter(|k| k.len() == here.len() + 1 && k.starts_with(here))
            {
                let name = child.last().map(String::as_str).unwrap_or_default();
                if !paths_after(&file.code, &format!("{name}::")).is_empty() {
                    named.push(child.clone());
                }
            }
        }
        let edges = graph.entry(here.clone()).or_default();
        for target in named.into_iter().filter_map(&resolve) {
            if &target != here {
                edges.insert(target);
            }
        }
    }
    graph
}

fn show(module: &ModPath) -> String {
    module.join("::")
}

/// A cycle through `start`, if there is one.
fn cycle(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>, start: &ModPath) -> Option<Vec<ModPath>> {
    let mut stack = vec![(start.clone(), vec![start.clone()])];
    let mut seen = BTreeSet::new();
    while let Some((at, trail)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == start {
                return Some([trail.clone(), vec![start.clone()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), [trail.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

fn problems(lib: &str, files: &[File]) -> Vec<String> {
    let layers = layers(lib);
    let mut problems = Vec::new();
    let mut rank = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        for name in layer {
            if rank.insert(name.clone(), i + 1).is_some() {
                problems.push(format!("{name} is in two layers"));
            }
        }
    }
    for name in declared(lib) {
        if name != "layers" && !rank.contains_key(&name) {
            problems.push(format!("lib.rs declares {name}, which is in no layer"));
        }
    }
    let graph = imports(files);
    for (from, targets) in &graph {
        for to in targets {
            let (Some(a), Some(b)) = (rank.get(&from[0]), rank.get(&to[0])) else {
                continue;
            };
            if from[0] != to[0] && a <= b {
                problems.push(format!(
                    "{} (layer {a}) imports {} (layer {b}): only lower layers may be imported",
                    show(from),
                    show(to)
                ));
            }
        }
    }
    let mut reported = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = cycle(&graph, module) {
            let members: BTreeSet<_> = cycle.iter().cloned().collect();
            if reported.insert(members) {
                let names: Vec<_> = cycle.iter().map(show).collect();
                problems.push(format!("import cycle: {}", names.join(" -> ")));
            }
        }
    }
    problems
}

#[test]
fn no_module_imports_a_higher_layer_or_its_own_importer() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    assert!(
        layers(&lib).len() >= 5,
        "lib.rs has no \"# Layers\" list: {:?}",
        layers(&lib)
    );
    let mut all = Vec::new();
    files(&src(), &ModPath::new(), &mut all);
    assert!(all.len() > 20, "found only {} files", all.len());
    let problems = problems(&lib, &all);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The check itself fails on what it is for: an import from a higher layer,
/// a cycle, a module in no layer, and it ignores comments, strings and tests.
#[test]
fn the_check_finds_upward_imports_cycles_and_unplaced_modules() {
    let lib = "//! # Layers\n//!\n//! 1. [`low`]: below\n//! 2. [`high`]\n//!\n\
               //! # Other\n//! 3. [`nothing`]\nmod low;\nmod high;\nmod loose;\n";
    let file = |module: &[&str], is_mod_rs, code: &str| File {
        module: module.iter().map(|s| (*s).to_owned()).collect(),
        is_mod_rs,
        code: code_only(code),
    };
    let files = [
        file(&["high"], true, "use a::X;\nuse crate::low::Y;\n"),
        file(
            &["high", "a"],
            false,
            "use super::b::Z; // crate::low::nothing",
        ),
        file(
            &["high", "b"],
            false,
            "pub(crate) fn f() { super::a::g(); }",
        ),
        file(
            &["low"],
            false,
            "const S: &str = \"crate::high::no\";\nuse crate::{high::a, x};",
        ),
        file(&["loose"], false, ""),
    ];
    let found = problems(lib, &files);
    let expect = [
        "lib.rs declares loose, which is in no layer",
        "low (layer 1) imports high::a (layer 2): only lower layers may be imported",
        "import cycle: high::a -> high::b -> high::a",
    ];
    assert_eq!(found, expect, "{found:#?}");
}

#[test]
fn use_groups_expand_to_every_path() {
    let code = code_only("use crate::{a::{b, c::D}, e};\nlet x = crate::f::g(r#\"crate::h\"#);");
    let paths: Vec<String> = paths_after(&code, "crate::")
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(paths, ["a::b", "a::c::D", "e", "f::g"]);
}
