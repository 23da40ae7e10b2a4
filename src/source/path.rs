//! The `path` source: model files that are already on the local disk.

use std::path::{Path, PathBuf};

use super::{ModelFiles, WeightFormat, format_of};
use crate::error::{Error, Result};

/// Checks that the files exist and returns them, relative paths resolved against `base`.
pub fn resolve(
    id: &str,
    base: &Path,
    weights: &[PathBuf],
    config: Option<&Path>,
    tokenizer: Option<&Path>,
) -> Result<ModelFiles> {
    let absolute = |p: &Path| {
        if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
    };
    let existing = |p: PathBuf, field: &str| {
        if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Fetch {
                id: id.to_string(),
                what: format!("source.{field} {}", p.display()),
                reason: "no such file".to_string(),
                remedy: "fix the path in models.toml (relative paths start at the models.toml directory)".to_string(),
            })
        }
    };
    let weights = weights.iter().map(|w| existing(absolute(w), "weights")).collect::<Result<Vec<_>>>()?;
    let format = format_of(id, &weights)?;
    let config = config.map(|c| existing(absolute(c), "config")).transpose()?;
    let tokenizer = tokenizer.map(|t| existing(absolute(t), "tokenizer")).transpose()?;
    if format == WeightFormat::Safetensors && (config.is_none() || tokenizer.is_none()) {
        return Err(Error::invalid(
            "models.toml",
            format!("models.{id}.source"),
            "safetensors weights need `config` (config.json) and `tokenizer` (tokenizer.json)",
        ));
    }
    let revision = weights.first().map(|w| w.display().to_string()).unwrap_or_default();
    let fingerprint = local_fingerprint(&weights);
    Ok(ModelFiles { id: id.to_string(), weights, format, config, tokenizer, revision, fingerprint })
}

/// sha256 over the paths, sizes and modification times of local files: changes whenever a file is replaced.
pub fn local_fingerprint(files: &[PathBuf]) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for file in files {
        let meta = std::fs::metadata(file).ok();
        let size = meta.as_ref().map(|m| m.len()).unwrap_or(0);
        let modified = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        hasher.update(format!("{}|{size}|{modified}\n", file.display()).as_bytes());
    }
    format!("local:{}", crate::cache::hex(&hasher.finalize()))
}
