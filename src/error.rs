//! The library's error type.
//!
//! Every variant carries the context a user needs to fix the problem without reading the code: the file, the field
//! and what was expected for bad input, the model id and the remedy for a model that cannot be fetched. The binary
//! and the test harness turn these errors into messages with `anyhow`; the library itself never panics on bad input.

use std::path::PathBuf;

/// Convenience alias used throughout the library.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong inside editguard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration or data file is malformed: names the file, the field and what was expected.
    #[error("{file}: {field}: {message}")]
    Invalid {
        /// The file that holds the bad value (with `:line` when known).
        file: String,
        /// The field (dotted path) that is wrong.
        field: String,
        /// What was found and what was expected.
        message: String,
    },

    /// A model id that the registry does not know.
    #[error("unknown model `{id}` (known: {known}); add it to {registry}")]
    UnknownModel {
        /// The id asked for.
        id: String,
        /// The ids the registry holds, comma-separated.
        known: String,
        /// Path of the registry file.
        registry: String,
    },

    /// A model's files could not be obtained from its source.
    #[error("model `{id}`: cannot obtain {what}: {reason}\n  what to do: {remedy}")]
    Fetch {
        /// The model id.
        id: String,
        /// What was being fetched (package, file, repository).
        what: String,
        /// Why it failed.
        reason: String,
        /// What the user can do about it.
        remedy: String,
    },

    /// A device was asked for that this build does not include or this machine does not have.
    #[error("device `{asked}`: {reason}\n  what to do: {remedy}")]
    Device {
        /// The device as asked (`cuda:0`, `metal`, …).
        asked: String,
        /// Why it cannot be used.
        reason: String,
        /// What the user can do about it.
        remedy: String,
    },

    /// A downloaded or cached file does not have the recorded checksum.
    #[error("{path}: sha256 is {actual}, models.toml records {expected} for model `{id}`")]
    Checksum {
        /// The model id.
        id: String,
        /// The file checked.
        path: PathBuf,
        /// The recorded digest.
        expected: String,
        /// The digest found.
        actual: String,
    },

    /// A dataset could not be found or read.
    #[error("dataset {name}: {message}")]
    Dataset {
        /// Dataset name (e.g. `ME-PPL_50`).
        name: String,
        /// What went wrong and where editguard looked.
        message: String,
    },

    /// A model file (GGUF, safetensors, config.json, tokenizer) is not what the architecture expects.
    #[error("model file {path}: {message}")]
    ModelFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },

    /// A metric came out NaN or infinite.
    #[error("metric {metric} is not finite ({value}); a non-finite metric is a failure")]
    NonFinite {
        /// Metric name.
        metric: String,
        /// The offending value.
        value: f64,
    },

    /// An I/O error with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl Error {
    /// Builds an [`Error::Invalid`].
    pub fn invalid(file: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid { file: file.into(), field: field.into(), message: message.into() }
    }

    /// Builds an [`Error::ModelFile`].
    pub fn model_file(path: impl Into<String>, message: impl Into<String>) -> Self {
        Error::ModelFile { path: path.into(), message: message.into() }
    }

    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

/// Fails with [`Error::NonFinite`] when `value` is NaN or infinite.
pub fn ensure_finite(metric: &str, value: f64) -> Result<f64> {
    if value.is_finite() { Ok(value) } else { Err(Error::NonFinite { metric: metric.to_string(), value }) }
}
