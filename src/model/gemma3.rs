//! The Gemma 3 text architecture (google/gemma-3-270m and its larger siblings without rope scaling), with hook points.
//!
//! Every point follows transformers' `modeling_gemma3.py`: token embeddings scaled by `√hidden` (an `f32` constant);
//! RMS norms computing `x / rms(x) · (1 + w)`; grouped-query attention whose queries and keys get a per-head RMS norm
//! before a half-split rotary embedding, with scores scaled by `query_pre_attn_scalar^-½`; layers of two kinds, sliding
//! (a window of `sliding_window` keys, the query's own included, rotary base `rope_local_base_freq`) and full (rotary
//! base `rope_theta`); sandwich norms (the attention and the MLP outputs are normalised again before each residual
//! addition); a GeGLU MLP `down(gelu_tanh(gate(x)) ⊙ up(x))`; a final norm and the tied (unscaled) embedding as output
//! layer. No soft-capping (absent in Gemma 3).
//!
//! Hook points are those of the other architectures: the MLP key is the input of `down`, the MLP output is what
//! `down` gives (before the post-feed-forward norm). GGUF files store the norm scales with the `+1` already added
//! (llama.cpp's converter does it), so they are read as they are; safetensors checkpoints get the `+1` at load time.
//! llama.cpp's GGUF metadata has no layer pattern, local rotary base or `query_pre_attn_scalar`: the GGUF loader uses
//! the values llama.cpp hard-codes for Gemma 3 (every sixth layer global, base 10,000, `1/√key_length`).

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
    Architecture { name: "gemma3", from_config: from_config_json, from_gguf: Some(from_gguf) };

/// Rotary tables are built for at most this many positions (Gemma 3 advertises 32,768; the tables for all of them
/// would take 130 MB per base). Longer inputs are refused by the rotary embedding.
const MAX_ROTARY_POSITIONS: usize = 8192;

/// Every `GGUF_GLOBAL_EVERY`-th layer is a full-attention layer in llama.cpp's Gemma 3 (its GGUF has no pattern key).
const GGUF_GLOBAL_EVERY: usize = 6;
/// The rotary base of sliding layers, hard-coded by llama.cpp and transformers alike.
const LOCAL_ROPE_BASE: f64 = 10_000.0;

/// Hyper-parameters, mirroring the Hugging Face `config.json` of `Gemma3ForCausalLM` (`gemma3_text`).
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma3Config {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Scores are scaled by this to the power −½.
    pub query_pre_attn_scalar: f64,
    /// Keys a sliding layer's query sees, its own included.
    pub sliding_window: usize,
    /// `sliding_attention` or `full_attention` per layer (transformers 5); derived from the pattern when absent.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Every n-th layer is global (older configs).
    #[serde(default, alias = "_sliding_window_pattern")]
    pub sliding_window_pattern: Option<usize>,
    /// Rotary base of full-attention layers (older configs).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary base of sliding layers (older configs).
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Per layer type `{"rope_theta": .., "rope_type": "default"}` (transformers 5).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Rope scaling; unsupported when set.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Longest sequence.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Activation of the gate.
    #[serde(default = "default_activation")]
    pub hidden_activation: String,
    /// Soft-capping of the final logits; unsupported when set.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Soft-capping of the attention scores; unsupported when set.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
}

fn default_max_positions() -> usize {
    32_768
}
fn default_activation() -> String {
    "gelu_pytorch_tanh".to_string()
}

/// What the forward pass needs, resolved from either source of hyper-parameters.
#[derive(Debug, Clone)]
struct Spec {
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    scale: f32,
    window: usize,
    /// Per layer: true for sliding-window layers.
    sliding: Vec<bool>,
    global_base: f64,
    local_base: f64,
    activation: GateActivation,
    vocab: usize,
    max_positions: usize,
}

impl Gemma3Config {
    /// The per-layer kinds, rotary bases and activation, refusing what the forward pass does not implement.
    fn resolve(&self, origin: &str) -> Result<Spec> {
        let bad = |field: &str, expected: String| Error::invalid(origin, field, expected);
        super::check_sizes(
            origin,
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("head_dim", self.head_dim),
                ("vocab_size", self.vocab_size),
            ],
        )?;
        let activation = GateActivation::from_name(&self.hidden_activation).ok_or_else(|| {
            bad("hidden_activation", format!("expected gelu_pytorch_tanh or silu, found `{}`", self.hidden_activation))
        })?;
        for (field, value) in [
            ("final_logit_softcapping", &self.final_logit_softcapping),
            ("attn_logit_softcapping", &self.attn_logit_softcapping),
        ] {
            if value.is_some() {
                return Err(bad(field, "soft-capping is not supported; expected null".to_string()));
            }
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(bad("rope_scaling", "rope scaling is not supported yet; expected null".to_string()));
        }
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(bad("num_key_value_heads", "must divide num_attention_heads".to_string()));
        }
        let layers = self.num_hidden_layers;
        let sliding: Vec<bool> = match (&self.layer_types, self.sliding_window_pattern) {
            (Some(types), _) => {
                if types.len() != layers {
                    return Err(bad("layer_types", format!("expected {layers} entries, found {}", types.len())));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(bad(
                            "layer_types",
                            format!("expected sliding_attention or full_attention, found `{other}`"),
                        )),
                    })
                    .collect::<Result<_>>()?
            }
            (None, Some(every)) if every > 0 => (0..layers).map(|i| (i + 1) % every != 0).collect(),
            (None, _) => return Err(bad("layer_types", "needed (or sliding_window_pattern)".to_string())),
        };
        let base_of = |kind: &str, fallback: Option<f64>| -> Result<f64> {
            let from_parameters = self.rope_parameters.as_ref().and_then(|p| p.get(kind)).map(|p| {
                let kind_of = p.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
                if kind_of != "default" {
                    return Err(bad(
                        &format!("rope_parameters.{kind}.rope_type"),
                        format!("expected `default`, found `{kind_of}`"),
                    ));
                }
                p.get("rope_theta")
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| bad(&format!("rope_parameters.{kind}.rope_theta"), "a number".to_string()))
            });
            match (from_parameters, fallback) {
                (Some(base), _) => base,
                (None, Some(base)) => Ok(base),
                (None, None) => Err(bad(&format!("rope_parameters.{kind}.rope_theta"), "needed".to_string())),
            }
        };
        Ok(Spec {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            eps: self.rms_norm_eps,
            scale: self.query_pre_attn_scalar.powf(-0.5) as f32,
            window: self.sliding_window,
            sliding,
            global_base: base_of("full_attention", self.rope_theta.or(Some(1_000_000.0)))?,
            local_base: base_of("sliding_attention", self.rope_local_base_freq.or(Some(LOCAL_ROPE_BASE)))?,
            activation,
            vocab: self.vocab_size,
            max_positions: self.max_position_embeddings,
        })
    }

    /// Reads the hyper-parameters from GGUF metadata (`gemma3.*` keys) and llama.cpp's hard-coded Gemma 3 values.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.string("general.architecture")?;
        if arch != "gemma3" {
            return Err(Error::model_file(
                file.path().display().to_string(),
                format!("general.architecture is `{arch}`, expected `gemma3`"),
            ));
        }
        let heads = file.size("gemma3.attention.head_count")?;
        let hidden = file.size("gemma3.embedding_length")?;
        let head_dim = file.size_or("gemma3.attention.key_length", hidden / heads)?;
        let layers = file.block_count("gemma3.block_count")?;
        let layer_types = (0..layers)
            .map(|i| if (i + 1) % GGUF_GLOBAL_EVERY == 0 { "full_attention" } else { "sliding_attention" }.to_string())
            .collect();
        Ok(Gemma3Config {
            hidden_size: hidden,
            intermediate_size: file.size("gemma3.feed_forward_length")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: file.size_or("gemma3.attention.head_count_kv", heads)?,
            head_dim,
            rms_norm_eps: file.f64("gemma3.attention.layer_norm_rms_epsilon")?,
            query_pre_attn_scalar: head_dim as f64,
            sliding_window: file.size("gemma3.attention.sliding_window")?,
            layer_types: Some(layer_types),
            sliding_window_pattern: None,
            rope_theta: Some(file.f64("gemma3.rope.freq_base").unwrap_or(1_000_000.0)),
            rope_local_base_freq: Some(LOCAL_ROPE_BASE),
            rope_parameters: None,
            rope_scaling: None,
            max_position_embeddings: file.size_or("gemma3.context_length", 32_768)?,
            vocab_size: file.array("tokenizer.ggml.tokens")?.len(),
            hidden_activation: default_activation(),
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
        })
    }
}

/// One decoder layer; Q, K and V are stacked into one matrix, and so are gate and up.
struct Block {
    input_norm: Tensor,
    qkv: Tensor,
    query_norm: Tensor,
    key_norm: Tensor,
    o: Tensor,
    post_attention_norm: Tensor,
    pre_mlp_norm: Tensor,
    mlp: GatedMlp,
    post_mlp_norm: Tensor,
}

/// A loaded Gemma 3 network.
pub struct Gemma3 {
    spec: Spec,
    embed: Tensor,
    embed_scale: f64,
    blocks: Vec<Block>,
    norm: Tensor,
    global_rotary: Rotary,
    local_rotary: Rotary,
}

fn from_config_json(
    text: &str,
    origin: &str,
    weights: &dyn WeightSource,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn CausalLm>> {
    let config: Gemma3Config =
        serde_json::from_str(text).map_err(|e| Error::invalid(origin, "(config)", e.to_string()))?;
    Ok(Box::new(Gemma3::load(&config, origin, weights, NormScale::PlusOne, dtype, device)?))
}

fn from_gguf(file: &GgufFile, dtype: DType, device: &Device) -> Result<Box<dyn CausalLm>> {
    let config = Gemma3Config::from_gguf(file)?;
    let origin = file.path().display().to_string();
    Ok(Box::new(Gemma3::load(&config, &origin, &GgufWeights::gemma3(file), NormScale::AsStored, dtype, device)?))
}

/// How stored norm weights relate to the scale `x / rms(x)` is multiplied by.
#[derive(Debug, Clone, Copy)]
enum NormScale {
    /// Hugging Face checkpoints store `w`; the scale is `1 + w`.
    PlusOne,
    /// GGUF files store the scale itself.
    AsStored,
}

impl Gemma3 {
    fn load(
        config: &Gemma3Config,
        origin: &str,
        weights: &dyn WeightSource,
        norms: NormScale,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let spec = config.resolve(origin)?;
        let get = |name: String, shape: &[usize]| weights.get_shaped(&name, shape, dtype, device);
        let (hidden, inter, head_dim) = (spec.hidden, config.intermediate_size, config.head_dim);
        let (q_rows, kv_rows) = (config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim);
        let norm = |name: String, width: usize| -> Result<Tensor> {
            let stored = get(name, &[width])?;
            Ok(match norms {
                NormScale::PlusOne => (stored + 1.0)?,
                NormScale::AsStored => stored,
            })
        };
        let blocks = load_layers(config.num_hidden_layers, |i| {
            let p = |suffix: &str| format!("model.layers.{i}.{suffix}");
            let qkv = [
                get(p("self_attn.q_proj.weight"), &[q_rows, hidden])?,
                get(p("self_attn.k_proj.weight"), &[kv_rows, hidden])?,
                get(p("self_attn.v_proj.weight"), &[kv_rows, hidden])?,
            ];
            Ok(Block {
                input_norm: norm(p("input_layernorm.weight"), hidden)?,
                qkv: Tensor::cat(&qkv, 0)?,
                query_norm: norm(p("self_attn.q_norm.weight"), head_dim)?,
                key_norm: norm(p("self_attn.k_norm.weight"), head_dim)?,
                o: get(p("self_attn.o_proj.weight"), &[hidden, q_rows])?,
                post_attention_norm: norm(p("post_attention_layernorm.weight"), hidden)?,
                pre_mlp_norm: norm(p("pre_feedforward_layernorm.weight"), hidden)?,
                mlp: GatedMlp::new(
                    get(p("mlp.gate_proj.weight"), &[inter, hidden])?,
                    get(p("mlp.up_proj.weight"), &[inter, hidden])?,
                    get(p("mlp.down_proj.weight"), &[hidden, inter])?,
                )?,
                post_mlp_norm: norm(p("post_feedforward_layernorm.weight"), hidden)?,
            })
        })?;
        let embed = get("model.embed_tokens.weight".to_string(), &[config.vocab_size, hidden])?;
        let positions = spec.max_positions.min(MAX_ROTARY_POSITIONS);
        let rotary = |base: f64| Rotary::new(spec.head_dim, base, positions, RotaryLayout::HalfSplit, dtype, device);
        Ok(Gemma3 {
            // transformers multiplies by `sqrt(hidden)` held as an f32 tensor.
            embed_scale: f64::from((spec.hidden as f32).sqrt()),
            global_rotary: rotary(spec.global_base)?,
            local_rotary: rotary(spec.local_base)?,
            norm: norm("model.norm.weight".to_string(), hidden)?,
            embed,
            blocks,
            spec,
        })
    }

    fn layout(&self, layer: usize) -> (AttentionShape, &Rotary) {
        let s = &self.spec;
        let shape = AttentionShape::new(s.heads, s.kv_heads, s.head_dim).with_scale(s.scale);
        if s.sliding.get(layer).copied().unwrap_or(false) {
            (shape.with_window(Some(s.window)), &self.local_rotary)
        } else {
            (shape, &self.global_rotary)
        }
    }

    /// RMS norm of every head of packed rows `(rows, heads·head_dim)` with one `(head_dim,)` scale.
    fn head_norm(&self, x: &Tensor, heads: usize, weight: &Tensor, path: Path) -> Result<Tensor> {
        let (rows, width) = x.dims2()?;
        let per_head = x.reshape((rows * heads, width / heads))?;
        Ok(rms_norm(&per_head, weight, self.spec.eps, path)?.reshape((rows, width))?)
    }
}

impl CausalLm for Gemma3 {
    fn dims(&self) -> ModelDims {
        let s = &self.spec;
        ModelDims {
            layers: s.sliding.len(),
            hidden: s.hidden,
            intermediate: s.intermediate,
            vocab: s.vocab,
            max_positions: s.max_positions.min(MAX_ROTARY_POSITIONS),
        }
    }

    fn embed(&self, input_ids: &Tensor, _packing: &Packing) -> Result<Tensor> {
        Ok((self.embed.index_select(input_ids, 0)? * self.embed_scale)?)
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
        let s = &self.spec;
        let b = &self.blocks[index];
        let (shape, rotary) = self.layout(index);
        let (q_width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let qkv = linear(&rms_norm(&h, &b.input_norm, s.eps, path)?, &b.qkv, None, path)?;
        let q = self.head_norm(&qkv.narrow(1, 0, q_width)?, s.heads, &b.query_norm, path)?;
        let k = self.head_norm(&qkv.narrow(1, q_width, kv_width)?, s.kv_heads, &b.key_norm, path)?;
        let v = qkv.narrow(1, q_width + kv_width, kv_width)?;
        let context = attention(index, &q, &k, &v, packing, shape, Some(rotary), path, kv)?;
        let attended = rms_norm(&linear(&context, &b.o, None, path)?, &b.post_attention_norm, s.eps, path)?;
        let h = (h + attended)?;
        let x = hooks.visit(index, HookPoint::MlpInput, rms_norm(&h, &b.pre_mlp_norm, s.eps, path)?, packing)?;
        let gate_up =
            hooks.visit(index, HookPoint::MlpPreActivation, linear(&x, &b.mlp.gate_up, None, path)?, packing)?;
        let key = hooks.visit(
            index,
            HookPoint::MlpKey,
            gated_product(&gate_up, s.intermediate, s.activation, path)?,
            packing,
        )?;
        let mlp = hooks.visit(index, HookPoint::MlpOutput, linear(&key, &b.mlp.down, None, path)?, packing)?;
        let h = (h + rms_norm(&mlp, &b.post_mlp_norm, s.eps, path)?)?;
        hooks.visit(index, HookPoint::BlockOutput, h, packing)
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

    fn mlp_output_norm(&self, layer: usize) -> Option<(&Tensor, f64)> {
        Some((&self.blocks.get(layer)?.post_mlp_norm, self.spec.eps))
    }

    fn attention_layout(&self, layer: usize) -> (AttentionShape, Option<&Rotary>) {
        let (shape, rotary) = self.layout(layer);
        (shape, Some(rotary))
    }

    fn logits(&self, rows: &Tensor, path: Path) -> Result<Tensor> {
        let normed = rms_norm(rows, &self.norm, self.spec.eps, path)?;
        Ok(linear(&normed, &self.embed, None, path)?)
    }
}
