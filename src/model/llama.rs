//! The Llama architecture (SmolLM2, Llama-2, Llama-3 without rope scaling), with hook points.
//!
//! Pre-norm decoder blocks: RMS norm, grouped-query attention with half-split rotary embeddings, RMS norm, and a SwiGLU
//! MLP `down(silu(gate(x)) * up(x))`. The input of `down` is the MLP key ([`HookPoint::MlpKey`]). Weights come from
//! safetensors under Hugging Face names or from GGUF through [`GgufWeights`], which restores the Hugging Face row order
//! of the query and key projections.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::activation::GateActivation;
use super::gated_mlp::GatedMlp;
use super::gguf::{GgufFile, GgufWeights};
use super::hooks::{Hook, HookPoint};
use super::layers::{AttentionShape, Path, Rotary, RotaryLayout, gated_product, linear, rms_norm};
use super::packing::Packing;
use super::prefix::{KvMode, attention};
use super::weights::{WeightSource, load_layers};
use super::{Architecture, CausalLm, MlpProjection, ModelDims};
use crate::error::{Error, Result};

/// The registry row.
pub const ARCHITECTURE: Architecture =
    Architecture { name: "llama", from_config: from_config_json, from_gguf: Some(from_gguf) };

/// Hyper-parameters, mirroring the Hugging Face `config.json` of `LlamaForCausalLM`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); equals the query heads when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head width; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest sequence.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the output projection reuses the token embeddings.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Activation of the gate; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Rope scaling; unsupported when set.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Newer transformers versions write `{"rope_theta": .., "rope_type": "default"}` here instead.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".to_string()
}

impl LlamaConfig {
    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Folds `rope_parameters` (newer config.json files) into `rope_theta`, refusing non-default rope types.
    fn normalise_rope(&mut self, origin: &str) -> Result<()> {
        if let Some(parameters) = self.rope_parameters.as_ref().filter(|v| !v.is_null()) {
            if let Some(theta) = parameters.get("rope_theta").and_then(|v| v.as_f64()) {
                self.rope_theta = theta;
            }
            let kind = parameters.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
            if kind != "default" {
                return Err(Error::invalid(
                    origin,
                    "rope_parameters.rope_type",
                    format!("expected `default`, found `{kind}`"),
                ));
            }
        }
        Ok(())
    }

    fn check(&self, origin: &str) -> Result<()> {
        super::check_sizes(
            origin,
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.kv_heads()),
                ("head_dim", self.head_dim.unwrap_or(1)),
                ("vocab_size", self.vocab_size),
            ],
        )?;
        if self.hidden_act != "silu" {
            return Err(Error::invalid(origin, "hidden_act", format!("expected `silu`, found `{}`", self.hidden_act)));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Error::invalid(origin, "rope_scaling", "rope scaling is not supported yet; expected null"));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(Error::invalid(origin, "num_key_value_heads", "must divide num_attention_heads"));
        }
        Ok(())
    }

    /// Reads the hyper-parameters from GGUF metadata (`llama.*` keys).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.string("general.architecture")?;
        if arch != "llama" {
            return Err(Error::model_file(
                file.path().display().to_string(),
                format!("general.architecture is `{arch}`, expected `llama`"),
            ));
        }
        let heads = file.size("llama.attention.head_count")?;
        let hidden = file.size("llama.embedding_length")?;
        let vocab = match file.metadata().contains_key("llama.vocab_size") {
            true => file.size("llama.vocab_size")?,
            false => file.array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(LlamaConfig {
            hidden_size: hidden,
            intermediate_size: file.size("llama.feed_forward_length")?,
            num_hidden_layers: file.block_count("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(file.size_or("llama.attention.head_count_kv", heads)?),
            head_dim: Some(file.size_or("llama.rope.dimension_count", hidden / heads)?),
            rms_norm_eps: file.f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: file.f64("llama.rope.freq_base").unwrap_or(10_000.0),
            max_position_embeddings: file.size_or("llama.context_length", 2048)?,
            vocab_size: vocab,
            tie_word_embeddings: !file.has_tensor("output.weight"),
            hidden_act: "silu".to_string(),
            rope_scaling: None,
            rope_parameters: None,
        })
    }
}

/// One decoder layer. Query, key and value projections are stacked into one matrix, and so are gate and up, so
/// that each takes a single, larger matrix product.
struct Block {
    input_norm: Tensor,
    qkv: Tensor,
    o: Tensor,
    post_norm: Tensor,
    mlp: GatedMlp,
}

/// A loaded Llama network.
pub struct Llama {
    config: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    rotary: Rotary,
}

fn from_config_json(
    text: &str,
    origin: &str,
    weights: &dyn WeightSource,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn CausalLm>> {
    let config: LlamaConfig =
        serde_json::from_str(text).map_err(|e| Error::invalid(origin, "(config)", e.to_string()))?;
    Ok(Box::new(Llama::load(config, origin, weights, dtype, device)?))
}

fn from_gguf(file: &GgufFile, dtype: DType, device: &Device) -> Result<Box<dyn CausalLm>> {
    let config = LlamaConfig::from_gguf(file)?;
    let weights = GgufWeights::llama(file, config.num_attention_heads, config.kv_heads());
    let origin = file.path().display().to_string();
    Ok(Box::new(Llama::load(config, &origin, &weights, dtype, device)?))
}

/// The longest sequence the rotary table is built for: a file's context length is not trusted to size a table (a
/// corrupt `context_length` would allocate without bound); 32,768 covers the Llama-family models of the registry.
const MAX_ROTARY_POSITIONS: usize = 32_768;

impl Llama {
    /// Loads all weights of `config` from `weights`.
    pub fn load(
        mut config: LlamaConfig,
        origin: &str,
        weights: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.normalise_rope(origin)?;
        config.check(origin)?;
        let get = |name: String, shape: &[usize]| weights.get_shaped(&name, shape, dtype, device);
        let (hidden, inter, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (q_rows, kv_rows) = (config.num_attention_heads * config.head_dim(), config.kv_heads() * config.head_dim());
        let blocks = load_layers(config.num_hidden_layers, |i| {
            let p = |suffix: &str| format!("model.layers.{i}.{suffix}");
            let qkv = [
                get(p("self_attn.q_proj.weight"), &[q_rows, hidden])?,
                get(p("self_attn.k_proj.weight"), &[kv_rows, hidden])?,
                get(p("self_attn.v_proj.weight"), &[kv_rows, hidden])?,
            ];
            Ok(Block {
                input_norm: get(p("input_layernorm.weight"), &[hidden])?,
                qkv: Tensor::cat(&qkv, 0)?,
                o: get(p("self_attn.o_proj.weight"), &[hidden, q_rows])?,
                post_norm: get(p("post_attention_layernorm.weight"), &[hidden])?,
                mlp: GatedMlp::new(
                    get(p("mlp.gate_proj.weight"), &[inter, hidden])?,
                    get(p("mlp.up_proj.weight"), &[inter, hidden])?,
                    get(p("mlp.down_proj.weight"), &[hidden, inter])?,
                )?,
            })
        })?;
        let embed = get("model.embed_tokens.weight".to_string(), &[vocab, hidden])?;
        let lm_head = if config.tie_word_embeddings || !weights.contains("lm_head.weight") {
            embed.clone()
        } else {
            get("lm_head.weight".to_string(), &[vocab, hidden])?
        };
        // The rotary table covers at most MAX_ROTARY_POSITIONS positions (dims() reports the same bound).
        config.max_position_embeddings = config.max_position_embeddings.min(MAX_ROTARY_POSITIONS);
        let rotary = Rotary::new(
            config.head_dim(),
            config.rope_theta,
            config.max_position_embeddings,
            RotaryLayout::HalfSplit,
            dtype,
            device,
        )?;
        Ok(Llama { norm: get("model.norm.weight".to_string(), &[hidden])?, embed, blocks, lm_head, rotary, config })
    }

    fn attention_shape(&self) -> AttentionShape {
        let c = &self.config;
        AttentionShape::new(c.num_attention_heads, c.kv_heads(), c.head_dim())
    }
}

impl CausalLm for Llama {
    fn dims(&self) -> ModelDims {
        ModelDims {
            layers: self.config.num_hidden_layers,
            hidden: self.config.hidden_size,
            intermediate: self.config.intermediate_size,
            vocab: self.config.vocab_size,
            max_positions: self.config.max_position_embeddings,
        }
    }

    fn embed(&self, input_ids: &Tensor, _packing: &Packing) -> Result<Tensor> {
        Ok(self.embed.index_select(input_ids, 0)?)
    }

    fn layer(
        &self,
        index: usize,
        h: Tensor,
        packing: &Packing,
        hooks: &dyn Hook,
        path: Path,
        kv: KvMode,
    ) -> Result<Tensor> {
        let c = &self.config;
        let b = &self.blocks[index];
        let eps = c.rms_norm_eps;
        let shape = self.attention_shape();
        let (q_width, kv_width) = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim);
        let qkv = linear(&rms_norm(&h, &b.input_norm, eps, path)?, &b.qkv, None, path)?;
        let (q, k, v) = (
            qkv.narrow(1, 0, q_width)?,
            qkv.narrow(1, q_width, kv_width)?,
            qkv.narrow(1, q_width + kv_width, kv_width)?,
        );
        let context = attention(index, &q, &k, &v, packing, shape, Some(&self.rotary), path, kv)?;
        let h = (h + linear(&context, &b.o, None, path)?)?;
        let x = hooks.visit(index, HookPoint::MlpInput, rms_norm(&h, &b.post_norm, eps, path)?, packing)?;
        let gate_up =
            hooks.visit(index, HookPoint::MlpPreActivation, linear(&x, &b.mlp.gate_up, None, path)?, packing)?;
        let width = c.intermediate_size;
        let key = gated_product(&gate_up, width, GateActivation::Silu, path)?;
        let key = hooks.visit(index, HookPoint::MlpKey, key, packing)?;
        let mlp = hooks.visit(index, HookPoint::MlpOutput, linear(&key, &b.mlp.down, None, path)?, packing)?;
        hooks.visit(index, HookPoint::BlockOutput, (h + mlp)?, packing)
    }

    fn mlp_weight(&self, projection: MlpProjection, layer: usize) -> Option<Tensor> {
        self.blocks.get(layer)?.mlp.weight(projection)
    }

    fn replace_mlp_weight(&mut self, projection: MlpProjection, layer: usize, value: Tensor) -> Option<Tensor> {
        self.blocks.get_mut(layer)?.mlp.replace(projection, value)
    }

    fn restore_mlp_weight(&mut self, projection: MlpProjection, layer: usize, saved: Tensor) -> Option<()> {
        self.blocks.get_mut(layer)?.mlp.restore(projection, saved);
        Some(())
    }

    fn token_embedding(&self) -> &Tensor {
        &self.embed
    }

    fn attention_layout(&self, _layer: usize) -> (AttentionShape, Option<&Rotary>) {
        (self.attention_shape(), Some(&self.rotary))
    }

    fn logits(&self, rows: &Tensor, path: Path) -> Result<Tensor> {
        let normed = rms_norm(rows, &self.norm, self.config.rms_norm_eps, path)?;
        Ok(linear(&normed, &self.lm_head, None, path)?)
    }
}
