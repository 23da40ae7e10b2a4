//! Building blocks shared by the architectures, each with a fast path and a differentiable path.
//!
//! candle's fused kernels for RMS norm, layer norm, last-dimension softmax and rotary embeddings are fast but have no
//! backward pass: gradients silently stop at them. [`Path::Fast`] uses them for evaluation; [`Path::Differentiable`]
//! uses the composed versions (`rms_norm_slow`, `softmax`, `rope_slow`...) so that gradients reach hooked vectors and
//! optimised weights, and routes products with constant weights through [`matmul_frozen`].

use candle_core::{D, DType, Device, Result, Tensor};

use super::frozen::matmul_frozen;

/// Which implementation of the forward pass to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused kernels, no gradients: evaluation and statistics.
    Fast,
    /// Composed operations that propagate gradients: optimisation inside editing methods.
    Differentiable,
}

/// `x · Wᵀ (+ b)` for `x: (..., in)`, `w: (out, in)`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, path: Path) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let in_features = dims.pop().unwrap_or(0);
    let out_features = w.dim(0)?;
    let flat = x.reshape(((), in_features))?;
    let y = if path == Path::Differentiable && flat.track_op() && !w.track_op() {
        matmul_frozen(&flat, w)?
    } else {
        flat.matmul(&w.t()?)?
    };
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    dims.push(out_features);
    y.reshape(dims)
}

/// RMS normalisation with a learned scale.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        Path::Differentiable => candle_nn::ops::rms_norm_slow(x, weight, eps as f32),
    }
}

/// Layer normalisation with scale and bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32),
        Path::Differentiable => candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32),
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::softmax_last_dim(x),
        Path::Differentiable => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryLayout {
    /// Dimension `i` pairs with `i + d/2` (Llama in Hugging Face layout).
    HalfSplit,
    /// Dimension `2i` pairs with `2i + 1` (GPT-J).
    Interleaved,
}

/// Precomputed rotary tables.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    layout: RotaryLayout,
    rotary_dim: usize,
}

impl Rotary {
    /// Tables for `max_positions` positions over the first `rotary_dim` dimensions of each head.
    pub fn new(
        rotary_dim: usize,
        theta: f64,
        max_positions: usize,
        layout: RotaryLayout,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> =
            (0..rotary_dim).step_by(2).map(|i| (1.0 / theta.powf(i as f64 / rotary_dim as f64)) as f32).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, rotary_dim / 2), device)?;
        let positions =
            Tensor::arange(0u32, max_positions as u32, device)?.to_dtype(DType::F32)?.reshape((max_positions, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Rotary { cos: angles.cos()?.to_dtype(dtype)?, sin: angles.sin()?.to_dtype(dtype)?, layout, rotary_dim })
    }

    /// Rotates `x: (batch, heads, tokens, head_dim)` for positions `0..tokens`.
    pub fn apply(&self, x: &Tensor, path: Path) -> Result<Tensor> {
        let (_, _, tokens, head_dim) = x.dims4()?;
        if tokens > self.cos.dim(0)? {
            candle_core::bail!("sequence of {tokens} tokens exceeds the {} rotary positions", self.cos.dim(0)?);
        }
        let cos = self.cos.narrow(0, 0, tokens)?;
        let sin = self.sin.narrow(0, 0, tokens)?;
        let (rotated, rest) = if self.rotary_dim == head_dim {
            (x.contiguous()?, None)
        } else {
            let rest = x.narrow(D::Minus1, self.rotary_dim, head_dim - self.rotary_dim)?;
            (x.narrow(D::Minus1, 0, self.rotary_dim)?.contiguous()?, Some(rest))
        };
        let rotated = match (self.layout, path) {
            (RotaryLayout::HalfSplit, Path::Fast) => candle_nn::rotary_emb::rope(&rotated, &cos, &sin)?,
            (RotaryLayout::HalfSplit, Path::Differentiable) => candle_nn::rotary_emb::rope_slow(&rotated, &cos, &sin)?,
            (RotaryLayout::Interleaved, Path::Fast) => candle_nn::rotary_emb::rope_i(&rotated, &cos, &sin)?,
            (RotaryLayout::Interleaved, Path::Differentiable) => {
                candle_nn::rotary_emb::rope_i_slow(&rotated, &cos, &sin)?
            }
        };
        match rest {
            Some(rest) => Tensor::cat(&[&rotated, &rest], D::Minus1),
            None => Ok(rotated),
        }
    }
}

/// Causal self-attention over `q: (b, heads, t, d)`, `k, v: (b, kv_heads, t, d)`; returns `(b, t, heads * d)`.
///
/// Rows are right-padded, so the causal mask alone keeps padding out of every real token's context.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, path: Path) -> Result<Tensor> {
    let (batch, heads, tokens, head_dim) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let repeat = heads / kv_heads;
    let k = candle_transformers::utils::repeat_kv(k.clone(), repeat)?.contiguous()?;
    let v = candle_transformers::utils::repeat_kv(v.clone(), repeat)?.contiguous()?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
    let scores = scores.broadcast_add(&causal_mask(tokens, scores.dtype(), q.device())?)?;
    let weights = softmax_last(&scores, path)?;
    let context = weights.matmul(&v)?;
    context.transpose(1, 2)?.reshape((batch, tokens, heads * head_dim))
}

/// `(t, t)` additive mask: 0 on and below the diagonal, −∞ above.
pub fn causal_mask(tokens: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..tokens).flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (tokens, tokens), device)?.to_dtype(dtype)
}

/// Splits `(b, t, heads * d)` into `(b, heads, t, d)`.
pub fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (batch, tokens, _) = x.dims3()?;
    x.reshape((batch, tokens, heads, head_dim))?.transpose(1, 2)
}

/// Scale and bias of a layer norm.
pub struct LayerNormWeights {
    /// Scale.
    pub weight: Tensor,
    /// Bias.
    pub bias: Tensor,
    /// Epsilon.
    pub eps: f64,
}

impl LayerNormWeights {
    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor, path: Path) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps, path)
    }
}
