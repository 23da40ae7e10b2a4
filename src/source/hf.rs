//! The `hf` source: a Hugging Face Hub repository resolved with hf-hub.
//!
//! Files are looked up in the local Hub cache first (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, the same layout the Python client writes), both through a branch ref and directly
//! under `snapshots/<commit>` when the revision is a pinned commit. Only missing files are downloaded, and never when
//! `HF_HUB_OFFLINE=1`. A `*.safetensors.index.json` weight entry expands to the shards its `weight_map` names.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::{ModelFiles, WeightFormat, format_of};
use crate::error::{Error, Result};

/// Where the Hub cache lives and whether the network may be used.
#[derive(Debug, Clone)]
pub struct HubCache {
    /// The `hub` cache directory (holding `models--org--name` folders).
    pub path: PathBuf,
    /// True when downloads are forbidden (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubCache {
    /// Reads `HF_HUB_CACHE`, `HF_HOME` and `HF_HUB_OFFLINE` like the Python client does.
    pub fn from_env() -> Self {
        let path = match std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => hf_hub::Cache::from_env().path().clone(),
        };
        let offline =
            std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        HubCache { path, offline }
    }

    fn repo(&self, repo: &str, revision: &str) -> hf_hub::Repo {
        hf_hub::Repo::with_revision(repo.to_string(), hf_hub::RepoType::Model, revision.to_string())
    }

    /// The cached copy of `file`, if any.
    pub fn cached(&self, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
        let cache = hf_hub::Cache::new(self.path.clone());
        let hf_repo = self.repo(repo, revision);
        if let Some(path) = cache.repo(hf_repo.clone()).get(file) {
            return Some(path);
        }
        let snapshot = self.path.join(hf_repo.folder_name()).join("snapshots").join(revision).join(file);
        snapshot.is_file().then_some(snapshot)
    }

    /// The cached copy of `file`, downloading it first when allowed.
    pub fn get(&self, id: &str, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
        if let Some(path) = self.cached(repo, revision, file) {
            return Ok(path);
        }
        let fetch_error = |reason: String, remedy: &str| Error::Fetch {
            id: id.to_string(),
            what: format!("{file} from the Hub repository {repo}@{revision}"),
            reason,
            remedy: remedy.to_string(),
        };
        if self.offline {
            return Err(fetch_error(
                format!("HF_HUB_OFFLINE is set and {} holds no copy", self.path.display()),
                "unset HF_HUB_OFFLINE on a machine with network, or copy the repository into the Hub cache",
            ));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(self.path.clone()))
            .with_progress(true)
            .build()
            .map_err(|e| fetch_error(e.to_string(), "check HF_HOME / HF_HUB_CACHE"))?;
        api.repo(self.repo(repo, revision)).get(file).map_err(|e| {
            fetch_error(
                e.to_string(),
                "check network access to the Hub (set HF_TOKEN for gated models such as Llama-2), \
                 or use a `path` source with local files",
            )
        })
    }
}

/// Resolves config, tokenizer and weights of `repo@revision`.
pub fn fetch(id: &str, repo: &str, revision: &str, weights: &[String], hub: &HubCache) -> Result<ModelFiles> {
    let config = hub.get(id, repo, revision, "config.json")?;
    let tokenizer = hub.get(id, repo, revision, "tokenizer.json")?;
    let mut weight_files = Vec::new();
    for name in weights {
        if name.ends_with(".index.json") {
            let index = hub.get(id, repo, revision, name)?;
            for shard in shard_names(&index)? {
                weight_files.push(hub.get(id, repo, revision, &shard)?);
            }
        } else {
            weight_files.push(hub.get(id, repo, revision, name)?);
        }
    }
    let format = format_of(id, &weight_files)?;
    if format != WeightFormat::Safetensors {
        return Err(Error::invalid(
            "models.toml",
            format!("models.{id}.source.weights"),
            "hf sources load safetensors weights",
        ));
    }
    Ok(ModelFiles {
        id: id.to_string(),
        weights: weight_files,
        format,
        config: Some(config),
        tokenizer: Some(tokenizer),
        revision: format!("hf:{repo}@{revision}"),
        fingerprint: format!("hf:{repo}@{revision}"),
    })
}

/// The distinct shard file names of a `model.safetensors.index.json`, in order.
pub fn shard_names(index: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(index.display().to_string(), "(document)", e.to_string()))?;
    let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        Error::invalid(index.display().to_string(), "weight_map", "expected an object of tensor name -> shard file")
    })?;
    let names: BTreeSet<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    Ok(names.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn fake_cache() -> (tempfile::TempDir, HubCache) {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models--org--tiny");
        let snapshot = repo.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), COMMIT).unwrap();
        for file in ["config.json", "tokenizer.json", "a.safetensors", "b.safetensors"] {
            std::fs::write(snapshot.join(file), b"{}").unwrap();
        }
        std::fs::write(
            snapshot.join("model.safetensors.index.json"),
            r#"{"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}"#,
        )
        .unwrap();
        let hub = HubCache { path: dir.path().to_path_buf(), offline: true };
        (dir, hub)
    }

    #[test]
    fn resolves_branch_and_pinned_commit_offline() {
        let (_dir, hub) = fake_cache();
        for revision in ["main", COMMIT] {
            let files = fetch("tiny", "org/tiny", revision, &["model.safetensors.index.json".into()], &hub).unwrap();
            let names: Vec<_> = files.weights.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
            assert_eq!(names, ["a.safetensors", "b.safetensors"]);
            assert!(files.config.unwrap().ends_with("config.json"));
        }
    }

    #[test]
    fn offline_miss_names_model_and_file() {
        let (_dir, hub) = fake_cache();
        let err = fetch("tiny", "org/tiny", "main", &["missing.safetensors".into()], &hub).unwrap_err().to_string();
        assert!(err.contains("model `tiny`") && err.contains("missing.safetensors"), "{err}");
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    }
}
