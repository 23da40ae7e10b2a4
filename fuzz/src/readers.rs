//! What each fuzz target does with its input, as plain functions: the fuzz targets call them under libFuzzer, and
//! the engine tests (`tests/engine/fuzz_regressions.rs`) replay the kept corpora and every input that once failed
//! through the very same code, so a fixed finding stays fixed under `cargo test`.
//!
//! Each function feeds the bytes to one of editguard's readers and drops the result: success and a clear error are
//! both fine; a panic, a hang or an allocation out of proportion to the input is a finding.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use editguard::cases::Suite;
use editguard::data::counterfact::EditDataset;
use editguard::data::me_ppl::Corpus;
use editguard::harness::checked_registry;
use editguard::model::gguf::GgufFile;
use editguard::model::{ARCHITECTURES, tokenizer};
use editguard::registry::Registry;
use editguard::tasks::TASKS;

/// The project's own registry, which fuzzed suites are read against.
fn project_registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let root =
            if root.join("models.toml").is_file() { root } else { Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf() };
        let text = std::fs::read_to_string(root.join("models.toml")).expect("models.toml of the project");
        Registry::parse(&text, "models.toml", &root).expect("the project's models.toml is valid")
    })
}

/// The suite reader (`cases/*.toml`); a suite that parses must answer every question the harness asks of it.
pub fn suite(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(suite) = Suite::parse(text, Path::new("fuzzed.toml"), project_registry()) else { return };
    for case in suite.case_names() {
        for method in &suite.methods {
            for model in &suite.models {
                let _ = suite.tier_of(method, model, &case);
                let _ = suite.expected(method, model, &case);
            }
        }
    }
    let _ = suite.trial_cases();
}

/// The registry reader (`models.toml`) with every owner's check of its parts; a registry that parses must answer
/// lookups of every model it lists.
pub fn registry(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(registry) = checked_registry::parse(text, "fuzzed/models.toml", Path::new("/nonexistent-fuzz-base")) else {
        return;
    };
    for id in registry.ids() {
        if let Ok(entry) = registry.get(&id) {
            let _ = entry.architecture();
            let _ = entry.source.pypi_pieces();
        }
    }
}

/// The GGUF reader: header and metadata, the tokenizer rebuilt from metadata, and every architecture's GGUF loader
/// (hyper-parameters, tensor lookup, dequantisation).
pub fn gguf(data: &[u8]) {
    let file = temporary_file(data);
    let Ok(gguf) = GgufFile::open(file.path()) else { return };
    let _ = tokenizer::from_gguf(&gguf);
    let _ = tokenizer::gguf_bos(&gguf);
    for architecture in ARCHITECTURES {
        if let Some(load) = architecture.from_gguf {
            let _ = load(&gguf, DType::F32, &Device::Cpu);
        }
    }
}

/// The ME-PPL corpus reader, as `editguard ppl --corpus FILE` reads a user's corpus.
pub fn corpus(data: &[u8]) {
    let file = temporary_file(data);
    let _ = Corpus::parse(&file.path().display().to_string()).load(None);
}

/// What each task reads, relative to the data directory (MMLU: the files of its first subject; the missing others
/// end the read with an error after the fuzzed file was parsed).
fn files_of(task: &str) -> Vec<String> {
    let subject = editguard::tasks::mmlu::SUBJECTS[0];
    let files: &[&str] = match task {
        "piqa" => &["piqa/dev.jsonl", "piqa/dev-labels.lst"],
        "hellaswag" => &["hellaswag/hellaswag_val_full.txt.bz2"],
        "mmlu" => return vec![format!("mmlu/test/{subject}_test.csv")],
        "mmlu-5shot" => return vec![format!("mmlu/dev/{subject}_dev.csv"), format!("mmlu/test/{subject}_test.csv")],
        "sst2" | "sst2-gu" => &["sst2/test.tsv"],
        "rte" | "rte-gu" => &["rte/dev.tsv"],
        "boolq" | "boolq-gu" => &["boolq/boolq.jsonl"],
        "mutual" | "mutual-gu" => &["mutual/dev/dev_1.txt", "mutual/dev/dev_2.txt"],
        "lambada" => &["lambada/lambada_openai.jsonl"],
        "nq-open" => &["nq_open/NQ-open.dev.jsonl"],
        "squad2" => &["squad2/dev-v2.0.json"],
        "gsm8k" => &["gsm8k/test.jsonl"],
        "samsum" => &["samsum/test.jsonl"],
        "conll2003" => &["conll2003/test.txt"],
        _ => &[],
    };
    files.iter().map(|f| f.to_string()).collect()
}

/// The edit datasets the `datasets` target feeds after the tasks.
const EDIT_DATASETS: [&str; 3] = ["counterfact", "counterfact-train", "zsre"];

/// The tasks' data readers (JSON, JSON lines, CSV, TSV, HellaSwag's bzip2 text, CoNLL columns, MuTual's files) and
/// the COUNTERFACT / zsRE edit datasets. The first byte picks the reader; the rest is written where that reader
/// looks for its file in a fresh data directory (a two-file task gets the halves split at the first 0xFF byte;
/// HellaSwag's file is compressed first, so the fuzzer reaches its text parser).
pub fn datasets(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let dir = tempfile::tempdir().expect("temporary data directory");
    let pick = usize::from(selector) % (TASKS.len() + EDIT_DATASETS.len());
    if let Some(entry) = TASKS.get(pick) {
        let files = files_of(entry.name);
        assert!(!files.is_empty(), "the fuzz readers do not know the data files of task {}", entry.name);
        let (first, second) = match rest.iter().position(|&b| b == 0xFF) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &rest[..0]),
        };
        write_data(dir.path(), &files[0], first);
        if let Some(other) = files.get(1) {
            write_data(dir.path(), other, second);
        }
        let _ = (entry.build)().items(Some(dir.path()));
    } else {
        let dataset = EditDataset::parse(EDIT_DATASETS[pick - TASKS.len()]).expect("a known dataset");
        let path = dataset.locate(Some(dir.path())).expect("a data path");
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("data folder");
        std::fs::write(&path, rest).expect("write the input");
        let _ = dataset.load(Some(dir.path()));
    }
}

fn write_data(dir: &Path, relative: &str, bytes: &[u8]) {
    let path = dir.join(relative);
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("data folder");
    let bytes = if relative.ends_with(".bz2") {
        let mut encoder = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        encoder.write_all(bytes).expect("compress");
        encoder.finish().expect("compress")
    } else {
        bytes.to_vec()
    };
    std::fs::write(path, bytes).expect("write the input");
}

fn temporary_file(data: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temporary file");
    file.write_all(data).expect("write the input");
    file
}
