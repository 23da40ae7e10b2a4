//! The `hf` source: a Hugging Face Hub repository resolved with hf-hub.
//!
//! Files are looked up in the local Hub cache first (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, the same layout the Python client writes), both through a branch ref and directly
//! under `snapshots/<commit>` when the revision is a pinned commit. Only missing files are downloaded, and never when
//! `HF_HUB_OFFLINE=1`. A `*.safetensors.index.json` weight entry expands to the shards its `weight_map` names. A cached
//! large file is checked against the sha256 its blob is named by (through a content stamp, so it is hashed once and
//! again only after the file changed) and refused, with both digests, when it no longer matches.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{ModelFiles, WeightFormat, format_of};
use crate::cache::cache_root;
use crate::cache::stamp::{self, Verdict};
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

    /// The cached copy of `file`, downloading it first when allowed; a cached large file is verified by content.
    pub fn get(&self, id: &str, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
        if let Some(path) = self.cached(repo, revision, file) {
            verify_blob(id, &path, &cache_root().join("stamps").join("hf"))?;
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

/// Checks a cached Hub file whose blob is named by its sha256 (the Hub stores large, LFS-tracked files so, e.g. every
/// weight file) against that name, through a content stamp kept in `stamps` (editguard's own cache: the Hub cache is
/// not written to). Small files, whose blobs are named by a git object id, are not checked.
fn verify_blob(id: &str, path: &Path, stamps: &Path) -> Result<()> {
    let blob = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    let Some(name) = blob.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let expected = name.to_ascii_lowercase();
    match stamp::verify(&blob, &stamps.join(format!("{expected}.stamp")), &expected)? {
        Verdict::Stamped | Verdict::Rehashed | Verdict::Missing => Ok(()),
        Verdict::Corrupt { actual } => Err(Error::Fetch {
            id: id.to_string(),
            what: format!("the cached Hub file {} (blob {})", path.display(), blob.display()),
            reason: format!("its content is corrupt: sha256 {actual}, the Hub's blob name records {expected}"),
            remedy: format!("delete {} so that the next run downloads it again", blob.display()),
        }),
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

    #[cfg(unix)]
    #[test]
    fn a_blob_named_by_its_sha256_is_verified_and_a_corrupt_one_refused() {
        const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        let snapshot = dir.path().join("snapshots").join(COMMIT);
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(blobs.join(ABC), b"abc").unwrap();
        std::os::unix::fs::symlink(blobs.join(ABC), snapshot.join("model.safetensors")).unwrap();
        std::fs::write(blobs.join("0123456789abcdef0123456789abcdef01234567"), b"{}").unwrap();
        std::os::unix::fs::symlink(
            blobs.join("0123456789abcdef0123456789abcdef01234567"),
            snapshot.join("config.json"),
        )
        .unwrap();
        let stamps = dir.path().join("stamps");
        verify_blob("tiny", &snapshot.join("model.safetensors"), &stamps).unwrap();
        verify_blob("tiny", &snapshot.join("config.json"), &stamps).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(blobs.join(ABC), b"abd").unwrap();
        let error = verify_blob("tiny", &snapshot.join("model.safetensors"), &stamps).unwrap_err().to_string();
        assert!(error.contains(ABC) && error.contains("corrupt") && error.contains("model.safetensors"), "{error}");
    }
}
