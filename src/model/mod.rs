//! Models: the hookable causal-LM interface, the architecture table and the loaded model editing methods work on.
//!
//! Each architecture is one file implementing [`CausalLm`] plus one row of [`ARCHITECTURES`]. A [`LoadedModel`] joins
//! a network with its tokenizer and offers what editing methods need: hidden states under hooks (fast or
//! differentiable), logits at chosen tokens, and weight overrides `W → W + ΔW` that restore `W` exactly.

pub mod activation;
pub mod decode;
pub mod device;
pub mod gated_mlp;
pub mod gemma3;
pub mod generation;
pub mod gguf;
pub mod gguf_header;
pub mod gpt2;
pub mod gptj;
pub mod hooks;
pub mod kernels;
pub mod layers;
pub mod llama;
pub mod packing;
pub mod prefix;
pub mod sentencepiece;
pub mod tokenizer;
pub mod weights;

use std::ops::Range;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

pub use decode::{DecodeCache, SharedPrefix};
pub use generation::{Generation, GenerationRequest, generate_greedy};
pub use hooks::{AddAtSites, Capture, Hook, HookPoint, HookSet, NoHooks, ReplaceAtSites, Site};
pub use layers::Path;
pub use packing::{PackedBatch, Packing};
pub use prefix::{KvMode, KvRecorder, PrefixCache};

use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::source::{ModelFiles, WeightFormat};

/// Sizes of a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    /// Number of layers.
    pub layers: usize,
    /// Residual stream width.
    pub hidden: usize,
    /// MLP width (the size of an MLP key).
    pub intermediate: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Longest supported sequence.
    pub max_positions: usize,
}

/// A weight editing methods can read or override, in `(out_features, in_features)` orientation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightId {
    /// The MLP down-projection of a layer (`mlp.down_proj`, GPT-2 `mlp.c_proj`, GPT-J `mlp.fc_out`),
    /// shape `(hidden, intermediate)`.
    MlpDown(usize),
    /// The MLP gate projection of a gated MLP (Llama `mlp.gate_proj`), shape `(intermediate, hidden)`.
    MlpGate(usize),
    /// The MLP up-projection (Llama `mlp.up_proj`, GPT-2 `mlp.c_fc`, GPT-J `mlp.fc_in`), `(intermediate, hidden)`.
    MlpUp(usize),
    /// The token embedding matrix `(vocab, hidden)` (read-only).
    TokenEmbedding,
}

/// One of the linear maps of an MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MlpProjection {
    /// The gate of a gated MLP (absent in GPT-2 and GPT-J).
    Gate,
    /// The up-projection (the first linear map of a plain MLP).
    Up,
    /// The down-projection.
    Down,
}

impl WeightId {
    /// The MLP projection and layer this id names, if it names one.
    pub fn mlp(self) -> Option<(MlpProjection, usize)> {
        match self {
            WeightId::MlpGate(l) => Some((MlpProjection::Gate, l)),
            WeightId::MlpUp(l) => Some((MlpProjection::Up, l)),
            WeightId::MlpDown(l) => Some((MlpProjection::Down, l)),
            WeightId::TokenEmbedding => None,
        }
    }

    fn out_of_range(self) -> Error {
        Error::invalid(
            "(model)",
            format!("{self:?}"),
            "no such weight: layer index out of range, or no such projection",
        )
    }

    fn read_only(self) -> Error {
        Error::invalid("(model)", format!("{self:?}"), "this weight cannot be overridden")
    }
}

/// Checks that every `(field, size)` of a configuration is at least 1: sizes divide, index and size tables, so a 0
/// read from a file is refused here, naming the field, instead of dividing by zero later.
pub(crate) fn check_sizes(origin: &str, sizes: &[(&str, usize)]) -> Result<()> {
    match sizes.iter().find(|(_, size)| *size == 0) {
        Some((field, _)) => Err(Error::invalid(origin, *field, "expected a size of at least 1, found 0")),
        None => Ok(()),
    }
}

fn check_same_shape(current: &Tensor, new: &Tensor, id: WeightId) -> Result<()> {
    if current.shape() != new.shape() {
        return Err(Error::invalid(
            "(model)",
            format!("{id:?}"),
            format!("override has shape {:?}, the weight has {:?}", new.dims(), current.dims()),
        ));
    }
    Ok(())
}

/// A causal language model with hook points; one implementation per architecture.
pub trait CausalLm: Send + Sync {
    /// Sizes.
    fn dims(&self) -> ModelDims;
    /// Token (and, where the architecture has them, position) embeddings of packed `(rows,)` ids → `(rows, hidden)`.
    fn embed(&self, input_ids: &Tensor, packing: &Packing) -> Result<Tensor>;
    /// Runs layer `index` on the packed residual stream `(rows, hidden)`, calling `hooks` at its hook points; `kv`
    /// says whether attention records keys and values or reads a cached prefix.
    fn layer(
        &self,
        index: usize,
        hidden: Tensor,
        packing: &Packing,
        hooks: &dyn Hook,
        path: Path,
        kv: KvMode,
    ) -> Result<Tensor>;
    /// An MLP projection of a layer in `(out, in)` orientation (None: out of range, or no such projection).
    fn mlp_weight(&self, projection: MlpProjection, layer: usize) -> Option<Tensor>;
    /// Replaces an MLP projection (same shape, checked by the caller), returning what
    /// [`restore_mlp_weight`](Self::restore_mlp_weight) needs to undo it.
    fn replace_mlp_weight(&mut self, projection: MlpProjection, layer: usize, value: Tensor) -> Option<Tensor>;
    /// Undoes [`replace_mlp_weight`](Self::replace_mlp_weight) with what it returned, bit for bit. Undoing several
    /// replacements in reverse order gives back the very tensors there were before (no copies, no autograd history).
    fn restore_mlp_weight(&mut self, projection: MlpProjection, layer: usize, saved: Tensor) -> Option<()> {
        self.replace_mlp_weight(projection, layer, saved).map(|_| ())
    }
    /// The token embedding matrix `(vocab, hidden)`.
    fn token_embedding(&self) -> &Tensor;

    /// Runs `layers` in order (see [`layer`](Self::layer)).
    fn run_layers(
        &self,
        mut hidden: Tensor,
        packing: &Packing,
        layers: Range<usize>,
        hooks: &dyn Hook,
        path: Path,
        kv: KvMode,
    ) -> Result<Tensor> {
        for index in layers {
            hidden = self.layer(index, hidden, packing, hooks, path, kv)?;
        }
        Ok(hidden)
    }
    /// The attention shape (heads, score scale, sliding window) and rotary embedding of layer `layer`, for building
    /// prefix and decoding caches.
    fn attention_layout(&self, layer: usize) -> (layers::AttentionShape, Option<&layers::Rotary>);
    /// The RMS norm (weight, eps) a layer applies to its MLP output before adding it to the residual stream
    /// (Gemma's post-feed-forward norm), or None where the MLP output is added as it is.
    fn mlp_output_norm(&self, _layer: usize) -> Option<(&Tensor, f64)> {
        None
    }
    /// Final norm and output projection of residual rows `(n, hidden)` → logits `(n, vocab)`.
    fn logits(&self, rows: &Tensor, path: Path) -> Result<Tensor>;
    /// The current value of a weight.
    fn weight(&self, id: WeightId) -> Result<Tensor> {
        match id.mlp() {
            Some((projection, layer)) => self.mlp_weight(projection, layer).ok_or(id.out_of_range()),
            None => Ok(self.token_embedding().clone()),
        }
    }

    /// Replaces a weight (same shape), returning what [`restore_weight`](Self::restore_weight) needs to undo it.
    fn set_weight(&mut self, id: WeightId, value: Tensor) -> Result<Tensor> {
        let Some((projection, layer)) = id.mlp() else { return Err(id.read_only()) };
        let current = self.mlp_weight(projection, layer).ok_or(id.out_of_range())?;
        check_same_shape(&current, &value, id)?;
        self.replace_mlp_weight(projection, layer, value).ok_or(id.out_of_range())
    }

    /// Undoes [`set_weight`](Self::set_weight) with what it returned.
    fn restore_weight(&mut self, id: WeightId, saved: Tensor) -> Result<()> {
        let Some((projection, layer)) = id.mlp() else { return Err(id.read_only()) };
        self.restore_mlp_weight(projection, layer, saved).ok_or(id.out_of_range())
    }
}

/// Builds a network from `config.json` text and safetensors weights.
pub type FromConfig = fn(&str, &str, &dyn weights::WeightSource, DType, &Device) -> Result<Box<dyn CausalLm>>;
/// Builds a network from a GGUF file.
pub type FromGguf = fn(&gguf::GgufFile, DType, &Device) -> Result<Box<dyn CausalLm>>;

/// One row of the architecture table.
pub struct Architecture {
    /// The name used in models.toml.
    pub name: &'static str,
    /// Loader for Hugging Face checkpoints.
    pub from_config: FromConfig,
    /// Loader for GGUF files, where supported.
    pub from_gguf: Option<FromGguf>,
}

/// The architecture table: adding an architecture is one file plus one row here.
pub const ARCHITECTURES: &[Architecture] =
    &[llama::ARCHITECTURE, gpt2::ARCHITECTURE, gptj::ARCHITECTURE, gemma3::ARCHITECTURE];

/// Looks an architecture up by name.
pub fn architecture(name: &str) -> Result<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.name == name).ok_or_else(|| {
        let known: Vec<&str> = ARCHITECTURES.iter().map(|a| a.name).collect();
        Error::invalid("models.toml", "architecture", format!("unknown `{name}`; expected one of {}", known.join(", ")))
    })
}

/// Checks that every model of the registry names an architecture of [`ARCHITECTURES`], naming file, line and field.
pub fn check_architectures(registry: &Registry) -> Result<()> {
    for (id, entry) in &registry.models {
        let name = entry.architecture.get_ref();
        if !ARCHITECTURES.iter().any(|a| a.name == name) {
            let known: Vec<&str> = ARCHITECTURES.iter().map(|a| a.name).collect();
            return Err(Error::invalid(
                registry.located(entry.architecture.span()),
                format!("models.{id}.architecture"),
                format!("unknown architecture `{name}`; expected one of: {}", known.join(", ")),
            ));
        }
    }
    Ok(())
}

/// A network with its tokenizer, ready for measuring and editing.
pub struct LoadedModel {
    /// Registry id.
    pub id: String,
    /// Architecture name.
    pub architecture: String,
    /// What was loaded (package version, commit or path).
    pub revision: String,
    /// Identifies the weights' content (see [`ModelFiles::fingerprint`]).
    pub fingerprint: String,
    /// The network.
    pub network: Box<dyn CausalLm>,
    /// The tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// Device of all tensors.
    pub device: Device,
    /// Compute dtype.
    pub dtype: DType,
    /// Seconds spent loading (and dequantising) the weights.
    pub load_seconds: f64,
    /// The tokenizer's beginning-of-sequence token, if it has one.
    pub bos_token: Option<u32>,
    /// Whether [`encode`](Self::encode) starts sequences with `bos_token` (the registry's `bos` setting).
    prepend_bos: bool,
    /// Weight overrides applied and not yet restored.
    overrides: usize,
}

/// The original value of an overridden weight; give it back to [`LoadedModel::restore`].
#[must_use = "a weight backup restores the original weight; dropping it loses the way back"]
pub struct WeightBackup {
    id: WeightId,
    original: Tensor,
}

impl WeightBackup {
    /// The weight this backup belongs to.
    pub fn id(&self) -> WeightId {
        self.id
    }

    /// The original tensor.
    pub fn original(&self) -> &Tensor {
        &self.original
    }
}

impl LoadedModel {
    /// Fetches (if needed) and loads registry model `id`.
    pub fn load(registry: &Registry, id: &str, device: &Device) -> Result<Self> {
        let entry = registry.get(id)?;
        let files = crate::source::fetch(registry, id)?;
        let dtype = entry.dtype_for(device).to_candle();
        let mut model = Self::from_files(&files, entry.architecture(), dtype, device)?;
        model.set_bos(entry.bos).map_err(|_| {
            Error::invalid("models.toml", format!("models.{id}.bos"), "the model's tokenizer has no BOS token")
        })?;
        Ok(model)
    }

    /// Starts every sequence with the BOS token (`true`) or not; an error when there is no BOS token.
    pub fn set_bos(&mut self, on: bool) -> Result<()> {
        if on && self.bos_token.is_none() {
            return Err(Error::invalid("(model)", "bos", format!("{} has no BOS token", self.id)));
        }
        self.prepend_bos = on;
        Ok(())
    }

    /// The BOS token sequences start with, when they start with one.
    pub fn prepended_bos(&self) -> Option<u32> {
        self.bos_token.filter(|_| self.prepend_bos)
    }

    /// Loads a model from local files.
    pub fn from_files(files: &ModelFiles, architecture_name: &str, dtype: DType, device: &Device) -> Result<Self> {
        let started = Instant::now();
        let arch = architecture(architecture_name)?;
        let (network, tokenizer, bos_token) = match files.format {
            WeightFormat::Gguf => {
                let path = &files.weights[0];
                let file = gguf::GgufFile::open(path)?;
                let load = arch.from_gguf.ok_or_else(|| {
                    Error::model_file(path.display().to_string(), format!("GGUF is not supported for {}", arch.name))
                })?;
                let (tokenizer, bos) = match &files.tokenizer {
                    Some(path) => {
                        let tokenizer = tokenizer::from_file(path)?;
                        let bos = tokenizer::bos_of(&tokenizer);
                        (tokenizer, bos)
                    }
                    None => (tokenizer::from_gguf(&file)?, tokenizer::gguf_bos_token(&file)?),
                };
                (load(&file, dtype, device)?, tokenizer, bos)
            }
            WeightFormat::Safetensors => {
                let config_path = files.config.as_ref().ok_or_else(|| {
                    Error::invalid("models.toml", format!("models.{}.source.config", files.id), "config.json needed")
                })?;
                let tokenizer_path = files.tokenizer.as_ref().ok_or_else(|| {
                    Error::invalid("models.toml", format!("models.{}.source.tokenizer", files.id), "tokenizer needed")
                })?;
                let text = std::fs::read_to_string(config_path).map_err(|e| Error::io(config_path, e))?;
                let weights = weights::SafetensorsWeights::open(&files.weights)?;
                let origin = config_path.display().to_string();
                let tokenizer = tokenizer::from_file(tokenizer_path)?;
                let bos = tokenizer::bos_of(&tokenizer);
                ((arch.from_config)(&text, &origin, &weights, dtype, device)?, tokenizer, bos)
            }
        };
        Ok(LoadedModel {
            id: files.id.clone(),
            architecture: arch.name.to_string(),
            revision: files.revision.clone(),
            fingerprint: files.fingerprint.clone(),
            network,
            tokenizer,
            device: device.clone(),
            dtype,
            load_seconds: started.elapsed().as_secs_f64(),
            bos_token,
            prepend_bos: false,
            overrides: 0,
        })
    }

    /// Sizes of the network.
    pub fn dims(&self) -> ModelDims {
        self.network.dims()
    }

    /// Token ids of a text that begins a sequence: the BOS token first when the model's `bos` setting is on, then
    /// the text's tokens (no other special tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::from_iter(self.prepended_bos());
        ids.extend(tokenizer::encode_plain(&self.tokenizer, text)?);
        Ok(ids)
    }

    /// Token ids of a text that continues a sequence (a target after its prompt, an answer option): never a BOS.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        tokenizer::encode_plain(&self.tokenizer, text)
    }

    /// Packs token sequences into a batch on this model's device; a sequence longer than the model's positions is an
    /// error naming it (its position tables end there).
    pub fn batch(&self, sequences: &[&[u32]]) -> Result<PackedBatch> {
        let limit = self.dims().max_positions;
        if let Some((index, sequence)) = sequences.iter().enumerate().find(|(_, s)| s.len() > limit) {
            return Err(Error::invalid(
                "(input)",
                format!("sequence {index}"),
                format!("{} tokens, but model `{}` has {limit} positions", sequence.len(), self.id),
            ));
        }
        PackedBatch::new(sequences, &self.device)
    }

    /// Packed residual stream after all layers, `(rows, hidden)`.
    pub fn hidden_states(&self, batch: &PackedBatch, hooks: &dyn Hook, path: Path) -> Result<Tensor> {
        let embedded = self.network.embed(&batch.ids, &batch.packing)?;
        self.network.run_layers(embedded, &batch.packing, 0..self.dims().layers, hooks, path, KvMode::Plain)
    }

    /// Embeddings of a packed batch, `(rows, hidden)`.
    pub fn embed(&self, batch: &PackedBatch) -> Result<Tensor> {
        self.network.embed(&batch.ids, &batch.packing)
    }

    /// Runs `layers` on a packed residual stream (e.g. to reuse the layers below an edit across optimisation steps).
    pub fn run_layers(
        &self,
        hidden: Tensor,
        batch: &PackedBatch,
        layers: Range<usize>,
        hooks: &dyn Hook,
        path: Path,
    ) -> Result<Tensor> {
        self.network.run_layers(hidden, &batch.packing, layers, hooks, path, KvMode::Plain)
    }

    /// Like [`run_layers`](Self::run_layers) with an explicit key/value mode (recording, or a cached prefix).
    pub fn run_layers_kv(
        &self,
        hidden: Tensor,
        packing: &Packing,
        layers: Range<usize>,
        hooks: &dyn Hook,
        path: Path,
        kv: KvMode,
    ) -> Result<Tensor> {
        self.network.run_layers(hidden, packing, layers, hooks, path, kv)
    }

    /// Keeps the keys and values before `starts[i]` of every sequence of `packing` from a recorded pass.
    pub fn prefix_cache(&self, recorder: KvRecorder, packing: &Packing, starts: &[usize]) -> Result<PrefixCache> {
        PrefixCache::new(recorder, packing, starts, &self.layer_layouts())
    }

    /// Every layer's attention layout, indexed by layer.
    fn layer_layouts(&self) -> Vec<(layers::AttentionShape, Option<&layers::Rotary>)> {
        (0..self.dims().layers).map(|layer| self.network.attention_layout(layer)).collect()
    }

    /// A prefix cache for sequences continuing recorded ones: sequence `i` continues the first `starts[i]` tokens of
    /// recorded sequence `sources[i]` (see [`PrefixCache::shared`]).
    pub fn shared_prefix_cache(
        &self,
        recorder: KvRecorder,
        packing: &Packing,
        sources: &[usize],
        starts: &[usize],
    ) -> Result<PrefixCache> {
        PrefixCache::shared(recorder, packing, sources, starts, &self.layer_layouts())
    }

    /// The keys and values of a recorded pass over one sequence of `rows` tokens, as a prefix shared by decoding.
    pub fn shared_prefix(&self, recorder: KvRecorder, rows: usize) -> Result<std::sync::Arc<SharedPrefix>> {
        SharedPrefix::recorded(recorder, rows, &self.layer_layouts())
    }

    /// An empty decoding cache for `sequences` sequences continuing `shared`.
    pub fn decode_cache(&self, shared: std::sync::Arc<SharedPrefix>, sequences: usize) -> DecodeCache {
        DecodeCache::new(shared, sequences)
    }

    /// Logits `(sites, vocab)` at `(sequence, position)` sites of a packed hidden state.
    pub fn logits_at(&self, hidden: &Tensor, packing: &Packing, sites: &[Site], path: Path) -> Result<Tensor> {
        let rows = hidden.index_select(&packing.flat_indices(sites, hidden.device())?, 0)?;
        self.network.logits(&rows, path)
    }

    /// Logits `(rows, vocab)` at every packed token (tests and small inputs).
    pub fn all_logits(&self, batch: &PackedBatch, hooks: &dyn Hook, path: Path) -> Result<Tensor> {
        let hidden = self.hidden_states(batch, hooks, path)?;
        self.network.logits(&hidden, path)
    }

    /// Overrides a weight with `W + ΔW`; the backup restores `W` bit for bit.
    pub fn apply_delta(&mut self, id: WeightId, delta: &Tensor) -> Result<WeightBackup> {
        let current = self.network.weight(id)?;
        let updated = (&current + delta.to_dtype(current.dtype())?)?;
        let original = self.network.set_weight(id, updated)?;
        self.overrides += 1;
        Ok(WeightBackup { id, original })
    }

    /// Puts back the weight a backup was taken from.
    pub fn restore(&mut self, backup: WeightBackup) -> Result<()> {
        self.network.restore_weight(backup.id, backup.original)?;
        self.overrides = self.overrides.saturating_sub(1);
        Ok(())
    }

    /// True while no weight override is active: the model is as loaded.
    pub fn is_pristine(&self) -> bool {
        self.overrides == 0
    }
}
