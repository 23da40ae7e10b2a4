//! PyTorch's side of `editguard bench --pytorch PYTHON`: the same ME-PPL_50 perplexity run by transformers.
//!
//! The script `ci/pytorch_ppl.py` (built into the binary, written to a temporary file when needed) loads the model's
//! GGUF file with transformers, tokenises the corpus with or without BOS as the model's registry setting says, and
//! times full passes in batches of 10 sentences on as many threads as editguard uses, reporting JSON. It runs after
//! editguard's own measurement, in the same `bench` invocation, so both see the same machine; its mean perplexity is
//! printed beside editguard's as a check that both computed the same thing. The interpreter needs torch,
//! transformers, gguf and accelerate (a venv from PyPI).

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The script, as shipped in `ci/`.
const SCRIPT: &str = include_str!("../ci/pytorch_ppl.py");

/// What the PyTorch run reports (a subset of the script's JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PytorchRun {
    /// `pytorch X + transformers Y`.
    pub implementation: String,
    /// Tokens per pass (BOS included when on).
    pub tokens: usize,
    /// Seconds of the best pass.
    pub seconds: f64,
    /// Tokens per second of the best pass.
    pub tokens_per_second: f64,
    /// Mean per-sentence perplexity.
    pub mean_sentence_ppl: f64,
    /// Token-weighted corpus perplexity.
    pub corpus_ppl: f64,
    /// Seconds to load the GGUF file (dequantise, build the tokenizer).
    pub load_seconds: f64,
    /// Peak resident memory of the Python process in MiB.
    pub peak_rss_mib: f64,
    /// Threads torch used.
    pub threads: usize,
}

/// Runs the script with `python` on `gguf` over the corpus file `corpus`.
pub fn run(python: &str, gguf: &Path, corpus: &Path, bos: bool, threads: usize, repeats: usize) -> Result<PytorchRun> {
    let fail = |reason: String| Error::invalid("(bench --pytorch)", python, reason);
    let dir = tempfile::tempdir().map_err(|e| fail(format!("a temporary folder for the script: {e}")))?;
    let script = dir.path().join("pytorch_ppl.py");
    std::fs::write(&script, SCRIPT).map_err(|e| Error::io(&script, e))?;
    let output = Command::new(python)
        .arg(&script)
        .arg("--gguf")
        .arg(gguf)
        .arg("--corpus")
        .arg(corpus)
        .args(["--bos", if bos { "on" } else { "off" }])
        .args(["--threads", &threads.to_string(), "--batch", "10", "--repeats", &repeats.max(1).to_string()])
        .arg("--json")
        .output()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(fail(format!(
            "ci/pytorch_ppl.py exited with {} (the interpreter needs torch, transformers, gguf and accelerate): {}",
            output.status,
            tail.join(" | ")
        )));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| fail(format!("its JSON output did not parse: {e}")))
}
