//! Datasets: where they are found and how they are read.
//!
//! Datasets are read from a data directory laid out like `../shared/data` (see its README): `--data-dir`, else
//! `$EDITGUARD_DATA`, else the first of `./data`, `../shared/data` and `<crate>/../shared/data` that exists. Users
//! with network access can instead give a Hub dataset repository with the same layout as the data directory,
//! `--data-dir hf://<owner>/<repo>` (each file is fetched with hf-hub into its usual cache when first read), or name
//! a single file of a Hub dataset repository as `hf://<owner>/<repo>/<path>` (a perplexity corpus).

pub mod counterfact;
pub mod me_ppl;
pub mod request;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The error for a dataset file that cannot be opened or read.
pub fn unreadable(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Dataset { name: path.display().to_string(), message: format!("cannot read: {reason}") }
}

/// The text of a dataset file, or an error naming it.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| unreadable(path, e))
}

/// Environment variable naming the data directory.
pub const DATA_ENV: &str = "EDITGUARD_DATA";

/// Finds the data directory (see the module documentation for the order).
pub fn data_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return existing_dir(dir.to_path_buf(), "--data-dir");
    }
    if let Some(dir) = std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
        return existing_dir(PathBuf::from(dir), DATA_ENV);
    }
    let candidates = [
        PathBuf::from("data"),
        PathBuf::from("../shared/data"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    ];
    candidates.iter().find(|c| c.join("README.md").is_file() || c.join("ME-PPL").is_dir()).cloned().ok_or_else(|| {
        Error::Dataset {
            name: "(data directory)".to_string(),
            message: format!(
                "no data directory found (looked at ./data, ../shared/data, {}); pass --data-dir or set {DATA_ENV}",
                candidates[2].display()
            ),
        }
    })
}

fn existing_dir(dir: PathBuf, what: &str) -> Result<PathBuf> {
    if hub_root(&dir).is_some() || dir.is_dir() {
        Ok(dir)
    } else {
        Err(Error::Dataset {
            name: "(data directory)".into(),
            message: format!("{what} = {} is not a directory", dir.display()),
        })
    }
}

/// The `hf://<owner>/<repo>` address of a data directory on the Hub, if `dir` is one.
fn hub_root(dir: &Path) -> Option<String> {
    let text = dir.to_str()?;
    let rest = text.strip_prefix("hf://")?.trim_end_matches('/');
    (rest.split('/').count() == 2).then(|| format!("hf://{rest}"))
}

/// The local path of file `relative` of the data directory (see [`data_dir`]): joined to a local directory, or
/// fetched from a Hub data repository.
pub fn data_file(data_dir_override: Option<&Path>, relative: &str) -> Result<PathBuf> {
    let dir = data_dir(data_dir_override)?;
    match hub_root(&dir) {
        Some(root) => hub_dataset_file(&format!("{root}/{relative}")),
        None => Ok(dir.join(relative)),
    }
}

/// Resolves `hf://<owner>/<repo>/<path>` to a local file through the Hub cache (downloading when allowed).
pub fn hub_dataset_file(uri: &str) -> Result<PathBuf> {
    let rest = uri.strip_prefix("hf://").unwrap_or(uri);
    let mut parts = rest.splitn(3, '/');
    let (Some(owner), Some(repo), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Error::Dataset { name: uri.to_string(), message: "expected hf://<owner>/<repo>/<file>".into() });
    };
    let repo_id = format!("{owner}/{repo}");
    let hub = crate::source::hf::HubCache::from_env();
    let dataset = hf_hub::Repo::new(repo_id.clone(), hf_hub::RepoType::Dataset);
    if let Some(path) = hf_hub::Cache::new(hub.path.clone()).repo(dataset.clone()).get(file) {
        return Ok(path);
    }
    if hub.offline {
        return Err(Error::Dataset {
            name: uri.to_string(),
            message: "HF_HUB_OFFLINE is set and no cached copy".into(),
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(hub.path.clone()))
        .build()
        .map_err(|e| Error::Dataset { name: uri.to_string(), message: e.to_string() })?;
    api.repo(dataset).get(file).map_err(|e| Error::Dataset {
        name: uri.to_string(),
        message: format!("download from the Hub failed: {e}; use the local data directory instead"),
    })
}
