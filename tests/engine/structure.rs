//! The crate's layering as a test: every module imports only the modules listed before it in `lib.rs`'s map (and the
//! utilities), so the map stays true; and the CPU kernels import nothing of the architectures or caches beyond the
//! shared building blocks they compute on.

use std::path::{Path, PathBuf};

use crate::support::root;

/// `lib.rs`'s map from the bottom up.
const LAYERS: &[&str] = &[
    "registry",
    "source",
    "model",
    "data",
    "metrics",
    "methods",
    "tasks",
    "thresholds",
    "cases",
    "harness",
    "mining",
    "tracing",
    "shrink",
    "correlate",
    "bench_long",
    "bench_pytorch",
    "bench",
];

/// Modules any layer may use.
const UTILITIES: &[&str] = &["error", "cache", "plotting", "runtime"];

/// The crate root's re-exports of the error type.
const ROOT_REEXPORTS: &[&str] = &["Error", "Result"];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().is_some_and(|n| n != "tests.rs") {
            files.push(path);
        }
    }
    files
}

fn module_files(module: &str) -> Vec<PathBuf> {
    let src = root().join("src");
    let file = src.join(format!("{module}.rs"));
    if file.is_file() { vec![file] } else { rust_files(&src.join(module)) }
}

/// The `crate::…` paths a file's code (not its comments, not its test module) uses, with line numbers, without the
/// `crate::` (e.g. `model::layers::AttentionShape`).
fn crate_paths(file: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        let code = code.split("//").next().unwrap_or("");
        for (at, _) in code.match_indices("crate::") {
            let path: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            found.push((number + 1, path));
        }
    }
    found
}

/// The module a `crate::` path starts with.
fn first_segment(path: &str) -> &str {
    path.split("::").next().unwrap_or(path)
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let mut upward = Vec::new();
    for (level, module) in LAYERS.iter().enumerate() {
        for file in module_files(module) {
            for (line, path) in crate_paths(&file) {
                let used = first_segment(&path);
                let allowed = used == *module
                    || UTILITIES.contains(&used)
                    || ROOT_REEXPORTS.contains(&used)
                    || LAYERS[..level].contains(&used);
                if !allowed {
                    upward.push(format!("{}:{line}: {module} uses crate::{used}", file.display()));
                }
            }
        }
    }
    assert!(upward.is_empty(), "imports pointing upwards:\n{}", upward.join("\n"));
}

#[test]
fn utilities_import_no_layer() {
    let mut upward = Vec::new();
    for module in UTILITIES {
        for file in module_files(module) {
            for (line, path) in crate_paths(&file) {
                let used = first_segment(&path);
                let allowed = UTILITIES.contains(&used) || ROOT_REEXPORTS.contains(&used);
                if used != *module && !allowed {
                    upward.push(format!("{}:{line}: {module} uses crate::{used}", file.display()));
                }
            }
        }
    }
    assert!(upward.is_empty(), "utilities importing a layer:\n{}", upward.join("\n"));
}

#[test]
fn every_module_of_the_crate_is_on_the_map() {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(name) = line.strip_prefix("pub mod ").and_then(|l| l.strip_suffix(';')) {
            assert!(
                LAYERS.contains(&name) || UTILITIES.contains(&name),
                "src/lib.rs declares `{name}`, which this test's copy of the map does not place"
            );
        }
    }
}

#[test]
fn kernels_use_only_the_building_blocks_they_compute_on() {
    let allowed = ["kernels", "layers", "packing", "activation"];
    let mut wrong = Vec::new();
    for file in rust_files(&root().join("src/model/kernels")) {
        for (line, path) in crate_paths(&file) {
            let mut segments = path.split("::");
            let ok = match (segments.next(), segments.next()) {
                (Some("model"), Some(part)) => allowed.contains(&part),
                (Some(used), _) => UTILITIES.contains(&used) || ROOT_REEXPORTS.contains(&used),
                _ => false,
            };
            if !ok {
                wrong.push(format!("{}:{line}: crate::{path}", file.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "kernels reaching past their building blocks:\n{}", wrong.join("\n"));
}
