//! What every test of a harness run shares: the registry, the suites, where data and snapshots live, the device.
//!
//! The project root is `$CARGO_MANIFEST_DIR` (cargo and nextest set it for test binaries) or the current directory;
//! `models.toml`, `cases/` and `snapshots/` are read from there unless `$EDITGUARD_MODELS` or `$EDITGUARD_CASES`
//! point elsewhere. Models are loaded per test from the on-disk cache (well under a second for the default model),
//! so every test starts from pristine weights, in one process or in one process per test under nextest.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;

use crate::cases::{self, Suite};
use crate::error::Result;
use crate::model::LoadedModel;
use crate::registry::{REGISTRY_ENV, Registry};

use super::snapshot::SnapshotStore;

/// Environment variable naming the suite directory to use instead of `<root>/cases`.
pub const CASES_ENV: &str = "EDITGUARD_CASES";

/// The shared state of a harness run.
#[derive(Debug, Clone)]
pub struct HarnessContext {
    /// The project root.
    pub root: PathBuf,
    /// The model registry.
    pub registry: Registry,
    /// The suites, sorted by file name.
    pub suites: Vec<Suite>,
    /// Data directory override (`$EDITGUARD_DATA` and `../shared/data` are found by the data module).
    pub data_dir: Option<PathBuf>,
    /// The snapshot directory.
    pub snapshots: SnapshotStore,
    /// Where models run.
    pub device: Device,
}

impl HarnessContext {
    /// Reads the registry and the suites from the project root (see the module header).
    pub fn from_env() -> Result<Self> {
        let root = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_else(|| PathBuf::from("."));
        let registry_path = std::env::var_os(REGISTRY_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("models.toml"));
        let cases_dir = std::env::var_os(CASES_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("cases"));
        Self::new(&root, &registry_path, &cases_dir)
    }

    /// Reads `registry_path` and the suites in `cases_dir`; snapshots live in `<root>/snapshots`.
    pub fn new(root: &Path, registry_path: &Path, cases_dir: &Path) -> Result<Self> {
        let registry = super::checked_registry::from_file(registry_path)?;
        let suites = cases::load_dir(cases_dir, &registry)?;
        Ok(HarnessContext {
            root: root.to_path_buf(),
            registry,
            suites,
            data_dir: None,
            snapshots: SnapshotStore { dir: root.join("snapshots") },
            device: crate::model::device::open_requested(None)?,
        })
    }

    /// Loads a fresh copy of a model (fetched into the cache on first use).
    pub fn load_model(&self, id: &str) -> Result<LoadedModel> {
        LoadedModel::load(&self.registry, id, &self.device)
    }
}

/// What a snapshot records about how its numbers were produced (insta's `info`; not compared).
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Model id.
    pub model: String,
    /// What was loaded (package version, commit or path).
    pub revision: String,
    /// Fingerprint of the weight files.
    pub fingerprint: String,
    /// Device.
    pub device: String,
    /// Compute dtype.
    pub dtype: String,
    /// editguard's version.
    pub editguard: &'static str,
    /// The method and its hyper-parameters (seeds included), for edit tests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The method's hyper-parameter table from models.toml.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hyper_parameters: Option<toml::Table>,
    /// The suite's setting, edits, batch size, check interval and dataset seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    /// The thresholds in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<crate::thresholds::Thresholds>,
}

impl SnapshotInfo {
    /// The info of an unedited model's snapshot.
    pub fn unedited(model: &LoadedModel) -> Self {
        SnapshotInfo {
            model: model.id.clone(),
            revision: model.revision.clone(),
            fingerprint: model.fingerprint.clone(),
            device: format!("{:?}", model.device.location()),
            dtype: format!("{:?}", model.dtype),
            editguard: env!("CARGO_PKG_VERSION"),
            method: None,
            hyper_parameters: None,
            suite: None,
            thresholds: None,
        }
    }
}
