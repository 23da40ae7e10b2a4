//! The fuzz targets' kept inputs, replayed under `cargo test`: the seed and minimised corpora (`fuzz/corpus/<target>`)
//! and every input that once made a reader panic, hang or over-allocate (`fuzz/regressions/<target>`, each fixed).
//! They run through the very functions the fuzz targets call (`fuzz/src/readers.rs`), without libFuzzer.

#[path = "../../fuzz/src/readers.rs"]
#[allow(dead_code)]
mod readers;

use std::path::PathBuf;

use crate::support::root;

type Reader = fn(&[u8]);

const TARGETS: &[(&str, Reader)] = &[
    ("suite", readers::suite),
    ("registry", readers::registry),
    ("gguf", readers::gguf),
    ("datasets", readers::datasets),
    ("corpus", readers::corpus),
];

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for folder in ["corpus", "regressions"] {
        let dir = root().join("fuzz").join(folder).join(target);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            files.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
        }
    }
    files.sort();
    files
}

#[test]
fn every_kept_fuzz_input_is_read_without_a_panic() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, read) in TARGETS {
        let files = inputs(target);
        assert!(!files.is_empty(), "fuzz/corpus/{target} holds no inputs");
        for file in files {
            let data = std::fs::read(&file).unwrap();
            replayed += 1;
            if std::panic::catch_unwind(|| read(&data)).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "readers panicked on {} of {replayed} kept inputs:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
