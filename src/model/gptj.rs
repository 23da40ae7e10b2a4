//! The GPT-J architecture (GPT-J 6B), with hook points.
//!
//! One layer norm feeds attention and MLP in parallel: `h + attn(ln(h)) + mlp(ln(h))`. Attention uses rotary
//! embeddings on the first `rotary_dim` dimensions of each head only, pairing dimensions `2i` and `2i + 1`
//! ("rotate every two", the interleaved layout). Query, key and value projections have no bias; the output head does.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::hooks::{Hook, HookPoint};
use super::layers::{AttentionShape, LayerNormWeights, Path, Rotary, RotaryLayout, linear};
use super::packing::Packing;
use super::prefix::{KvMode, attention};
use super::weights::{WeightSource, load_layers};
use super::{Architecture, CausalLm, MlpProjection, ModelDims};
use crate::error::{Error, Result};

/// The registry row.
pub const ARCHITECTURE: Architecture = Architecture { name: "gptj", from_config: from_config_json, from_gguf: None };

/// Hyper-parameters, mirroring the Hugging Face `config.json` of `GPTJForCausalLM`.
#[derive(Debug, Clone, Deserialize)]
pub struct GptjConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence.
    pub n_positions: usize,
    /// Residual width.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Rotary dimensions per head (the rest pass through unrotated).
    pub rotary_dim: usize,
    /// MLP width; `4 * n_embd` when null.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Activation; `gelu_new` is supported.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Layer norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
}

fn default_activation() -> String {
    "gelu_new".to_string()
}
fn default_eps() -> f64 {
    1e-5
}

/// One layer; query, key and value projections are stacked into one matrix.
struct Block {
    ln_1: LayerNormWeights,
    qkv: Tensor,
    out: Tensor,
    fc_in: (Tensor, Tensor),
    fc_out: (Tensor, Tensor),
}

/// A loaded GPT-J network.
pub struct Gptj {
    config: GptjConfig,
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNormWeights,
    lm_head: (Tensor, Tensor),
    rotary: Rotary,
}

fn from_config_json(
    text: &str,
    origin: &str,
    weights: &dyn WeightSource,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn CausalLm>> {
    let config: GptjConfig =
        serde_json::from_str(text).map_err(|e| Error::invalid(origin, "(config)", e.to_string()))?;
    Ok(Box::new(Gptj::load(config, origin, weights, dtype, device)?))
}

impl Gptj {
    /// Loads all weights of `config` from `weights`.
    pub fn load(
        config: GptjConfig,
        origin: &str,
        weights: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        super::gpt2::check_activation(&config.activation_function, origin)?;
        let get = |name: &str| weights.get(name, dtype, device);
        let pair = |name: &str| -> Result<(Tensor, Tensor)> {
            Ok((get(&format!("{name}.weight"))?, get(&format!("{name}.bias"))?))
        };
        let norm = |name: &str| -> Result<LayerNormWeights> {
            let (weight, bias) = pair(name)?;
            Ok(LayerNormWeights { weight, bias, eps: config.layer_norm_epsilon })
        };
        let blocks = load_layers(config.n_layer, |i| {
            let p = |suffix: &str| format!("transformer.h.{i}.{suffix}");
            Ok(Block {
                ln_1: norm(&p("ln_1"))?,
                qkv: Tensor::cat(
                    &[get(&p("attn.q_proj.weight"))?, get(&p("attn.k_proj.weight"))?, get(&p("attn.v_proj.weight"))?],
                    0,
                )?,
                out: get(&p("attn.out_proj.weight"))?,
                fc_in: pair(&p("mlp.fc_in"))?,
                fc_out: pair(&p("mlp.fc_out"))?,
            })
        })?;
        let rotary =
            Rotary::new(config.rotary_dim, 10_000.0, config.n_positions, RotaryLayout::Interleaved, dtype, device)?;
        Ok(Gptj {
            wte: get("transformer.wte.weight")?,
            ln_f: norm("transformer.ln_f")?,
            lm_head: pair("lm_head")?,
            blocks,
            rotary,
            config,
        })
    }

    fn attention_shape(&self) -> AttentionShape {
        let heads = self.config.n_head;
        AttentionShape::new(heads, heads, self.config.n_embd / heads)
    }
}

impl CausalLm for Gptj {
    fn dims(&self) -> ModelDims {
        ModelDims {
            layers: self.config.n_layer,
            hidden: self.config.n_embd,
            intermediate: self.config.n_inner.unwrap_or(4 * self.config.n_embd),
            vocab: self.config.vocab_size,
            max_positions: self.config.n_positions,
        }
    }

    fn embed(&self, input_ids: &Tensor, _packing: &Packing) -> Result<Tensor> {
        Ok(self.wte.index_select(input_ids, 0)?)
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
        let x = b.ln_1.forward(&h, path)?;
        let qkv = linear(&x, &b.qkv, None, path)?;
        let part = |i: usize| qkv.narrow(1, i * width, width);
        let context = attention(index, &part(0)?, &part(1)?, &part(2)?, packing, shape, Some(&self.rotary), path, kv)?;
        let attention = linear(&context, &b.out, None, path)?;
        let mlp_input = hooks.visit(index, HookPoint::MlpInput, x, packing)?;
        let up = linear(&mlp_input, &b.fc_in.0, Some(&b.fc_in.1), path)?;
        let up = hooks.visit(index, HookPoint::MlpPreActivation, up, packing)?;
        let key = hooks.visit(index, HookPoint::MlpKey, up.gelu()?, packing)?;
        let mlp =
            hooks.visit(index, HookPoint::MlpOutput, linear(&key, &b.fc_out.0, Some(&b.fc_out.1), path)?, packing)?;
        hooks.visit(index, HookPoint::BlockOutput, ((h + attention)? + mlp)?, packing)
    }

    fn mlp_weight(&self, projection: MlpProjection, layer: usize) -> Option<Tensor> {
        let b = self.blocks.get(layer)?;
        match projection {
            MlpProjection::Gate => None,
            MlpProjection::Up => Some(b.fc_in.0.clone()),
            MlpProjection::Down => Some(b.fc_out.0.clone()),
        }
    }

    fn replace_mlp_weight(&mut self, projection: MlpProjection, layer: usize, value: Tensor) -> Option<Tensor> {
        let b = self.blocks.get_mut(layer)?;
        let slot = match projection {
            MlpProjection::Gate => return None,
            MlpProjection::Up => &mut b.fc_in.0,
            MlpProjection::Down => &mut b.fc_out.0,
        };
        Some(std::mem::replace(slot, value))
    }

    fn token_embedding(&self) -> &Tensor {
        &self.wte
    }

    fn attention_layout(&self, _layer: usize) -> (AttentionShape, Option<&Rotary>) {
        (self.attention_shape(), Some(&self.rotary))
    }

    fn logits(&self, rows: &Tensor, path: Path) -> Result<Tensor> {
        let normed = self.ln_f.forward(rows, path)?;
        Ok(linear(&normed, &self.lm_head.0, Some(&self.lm_head.1), path)?)
    }
}
