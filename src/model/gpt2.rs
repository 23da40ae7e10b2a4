//! The GPT-2 architecture (GPT-2 small to XL), with hook points.
//!
//! Pre-norm blocks with learned position embeddings, fused query/key/value projection and a GELU (tanh) MLP. GPT-2
//! checkpoints store linear weights as `Conv1D`, i.e. `(in_features, out_features)`; they are transposed once at load
//! so that hooks, overrides and ΔW use the `(out, in)` orientation of every other architecture. Checkpoints name
//! tensors with or without the `transformer.` prefix; both are accepted.

use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;

use super::hooks::{Hook, HookPoint};
use super::layers::{AttentionShape, LayerNormWeights, Path, Rotary, linear};
use super::packing::Packing;
use super::prefix::{KvMode, attention};
use super::weights::{WeightSource, load_layers};
use super::{Architecture, CausalLm, MlpProjection, ModelDims};
use crate::error::{Error, Result};

/// The registry row.
pub const ARCHITECTURE: Architecture = Architecture { name: "gpt2", from_config: from_config_json, from_gguf: None };

/// Hyper-parameters, mirroring the Hugging Face `config.json` of `GPT2LMHeadModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of learned positions.
    pub n_positions: usize,
    /// Residual width.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// MLP width; `4 * n_embd` when null.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Activation; `gelu_new` (tanh approximation) is supported.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Layer norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Must be true (the default).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Must be false (the default).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
}

fn default_activation() -> String {
    "gelu_new".to_string()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// Checks the activation name shared by GPT-2 and GPT-J configs.
pub(super) fn check_activation(name: &str, origin: &str) -> Result<()> {
    match name {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(()),
        other => Err(Error::invalid(origin, "activation_function", format!("expected `gelu_new`, found `{other}`"))),
    }
}

struct Block {
    ln_1: LayerNormWeights,
    attn_qkv: (Tensor, Tensor),
    attn_proj: (Tensor, Tensor),
    ln_2: LayerNormWeights,
    fc: (Tensor, Tensor),
    proj: (Tensor, Tensor),
}

/// A loaded GPT-2 network.
pub struct Gpt2 {
    config: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNormWeights,
}

fn from_config_json(
    text: &str,
    origin: &str,
    weights: &dyn WeightSource,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn CausalLm>> {
    let config: Gpt2Config =
        serde_json::from_str(text).map_err(|e| Error::invalid(origin, "(config)", e.to_string()))?;
    Ok(Box::new(Gpt2::load(config, origin, weights, dtype, device)?))
}

impl Gpt2 {
    /// Loads all weights of `config` from `weights`.
    pub fn load(
        config: Gpt2Config,
        origin: &str,
        weights: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_activation(&config.activation_function, origin)?;
        if !config.scale_attn_weights || config.scale_attn_by_inverse_layer_idx {
            return Err(Error::invalid(
                origin,
                "scale_attn_weights",
                "only the standard 1/sqrt(d) scaling is supported",
            ));
        }
        let get = |name: &str| {
            let names = [format!("transformer.{name}"), name.to_string()];
            weights.get_any(&names, dtype, device)
        };
        // Conv1D stores (in, out): transpose to (out, in).
        let conv = |name: &str| -> Result<(Tensor, Tensor)> {
            Ok((get(&format!("{name}.weight"))?.t()?.contiguous()?, get(&format!("{name}.bias"))?))
        };
        let norm = |name: &str| -> Result<LayerNormWeights> {
            Ok(LayerNormWeights {
                weight: get(&format!("{name}.weight"))?,
                bias: get(&format!("{name}.bias"))?,
                eps: config.layer_norm_epsilon,
            })
        };
        let blocks = load_layers(config.n_layer, |i| {
            Ok(Block {
                ln_1: norm(&format!("h.{i}.ln_1"))?,
                attn_qkv: conv(&format!("h.{i}.attn.c_attn"))?,
                attn_proj: conv(&format!("h.{i}.attn.c_proj"))?,
                ln_2: norm(&format!("h.{i}.ln_2"))?,
                fc: conv(&format!("h.{i}.mlp.c_fc"))?,
                proj: conv(&format!("h.{i}.mlp.c_proj"))?,
            })
        })?;
        Ok(Gpt2 { wte: get("wte.weight")?, wpe: get("wpe.weight")?, ln_f: norm("ln_f")?, blocks, config })
    }

    fn attention_shape(&self) -> AttentionShape {
        let heads = self.config.n_head;
        AttentionShape::new(heads, heads, self.config.n_embd / heads)
    }
}

impl CausalLm for Gpt2 {
    fn dims(&self) -> ModelDims {
        ModelDims {
            layers: self.config.n_layer,
            hidden: self.config.n_embd,
            intermediate: self.config.n_inner.unwrap_or(4 * self.config.n_embd),
            vocab: self.config.vocab_size,
            max_positions: self.config.n_positions,
        }
    }

    fn embed(&self, input_ids: &Tensor, packing: &Packing) -> Result<Tensor> {
        if packing.longest() > self.config.n_positions {
            let message = format!("{} tokens exceed n_positions = {}", packing.longest(), self.config.n_positions);
            return Err(Error::invalid("(input)", "tokens", message));
        }
        let words = self.wte.index_select(input_ids, 0)?;
        Ok((words + self.wpe.index_select(packing.positions(), 0)?)?)
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
        let b = &self.blocks[index];
        let width = self.config.n_embd;
        let shape = self.attention_shape();
        let qkv = linear(&b.ln_1.forward(&h, path)?, &b.attn_qkv.0, Some(&b.attn_qkv.1), path)?;
        let part = |i: usize| qkv.narrow(D::Minus1, i * width, width);
        let context = attention(index, &part(0)?, &part(1)?, &part(2)?, packing, shape, None, path, kv)?;
        let h = (h + linear(&context, &b.attn_proj.0, Some(&b.attn_proj.1), path)?)?;
        let x = hooks.visit(index, HookPoint::MlpInput, b.ln_2.forward(&h, path)?, packing)?;
        let up = hooks.visit(index, HookPoint::MlpPreActivation, linear(&x, &b.fc.0, Some(&b.fc.1), path)?, packing)?;
        let key = hooks.visit(index, HookPoint::MlpKey, up.gelu()?, packing)?;
        let mlp = hooks.visit(index, HookPoint::MlpOutput, linear(&key, &b.proj.0, Some(&b.proj.1), path)?, packing)?;
        hooks.visit(index, HookPoint::BlockOutput, (h + mlp)?, packing)
    }

    fn mlp_weight(&self, projection: MlpProjection, layer: usize) -> Option<Tensor> {
        let b = self.blocks.get(layer)?;
        match projection {
            MlpProjection::Gate => None,
            MlpProjection::Up => Some(b.fc.0.clone()),
            MlpProjection::Down => Some(b.proj.0.clone()),
        }
    }

    fn replace_mlp_weight(&mut self, projection: MlpProjection, layer: usize, value: Tensor) -> Option<Tensor> {
        let b = self.blocks.get_mut(layer)?;
        let slot = match projection {
            MlpProjection::Gate => return None,
            MlpProjection::Up => &mut b.fc.0,
            MlpProjection::Down => &mut b.proj.0,
        };
        Some(std::mem::replace(slot, value))
    }

    fn token_embedding(&self) -> &Tensor {
        &self.wte
    }

    fn attention_layout(&self, _layer: usize) -> (AttentionShape, Option<&Rotary>) {
        (self.attention_shape(), None)
    }

    fn logits(&self, rows: &Tensor, path: Path) -> Result<Tensor> {
        Ok(linear(&self.ln_f.forward(rows, path)?, &self.wte, None, path)?)
    }
}
