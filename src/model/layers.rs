//! Building blocks shared by the architectures, each with a fast path and a differentiable path.
//!
//! candle's fused kernels for RMS norm, layer norm, last-dimension softmax and rotary embeddings are fast but have no
//! backward pass: gradients silently stop at them. [`Path::Fast`] uses them for evaluation; [`Path::Differentiable`]
//! uses the composed versions (`rms_norm_slow`, `softmax`, `rope_slow`...) so that gradients reach hooked vectors and
//! optimised weights, and routes products with constant weights through [`matmul_frozen`]; on the CPU, RMS norm and
//! SwiGLU take single operations with hand-written gradients instead ([`super::kernels::fused`]).

use candle_core::{D, DType, Device, Result, Tensor};

use super::activation::{GateActivation, gated_product_fast};
use super::kernels::frozen::matmul_frozen;
use super::packing::Packing;

/// Which implementation of the forward pass to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused kernels, no gradients: evaluation and statistics.
    Fast,
    /// Composed operations that propagate gradients: optimisation inside editing methods.
    Differentiable,
}

/// Below this many rows, a product candle computes (operands [`super::kernels::cpu_matmul`] leaves alone, e.g. `f16` weights)
/// is taken as `(W · xᵀ)ᵀ`: the row-major weight is then streamed once instead of being repacked for every call,
/// which was up to four times faster for the few-token prompts of editing methods.
pub const SMALL_BATCH_ROWS: usize = 32;

/// `x · Wᵀ` for `x: (rows, in)`, `w: (out, in)`: split over the CPU worker pool when the operands qualify
/// ([`super::kernels::cpu_matmul`]), otherwise in the orientation that is fastest for this many rows.
pub fn matmul_transposed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if let Some(product) = super::kernels::cpu_matmul::try_matmul_weight_transposed(x, w)? {
        Ok(product)
    } else if x.dim(0)? < SMALL_BATCH_ROWS {
        w.matmul(&x.t()?)?.t()?.contiguous()
    } else {
        x.matmul(&w.t()?)
    }
}

/// `x · Wᵀ (+ b)` for packed rows `x: (rows, in)` and `w: (out, in)`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, path: Path) -> Result<Tensor> {
    let y = if path == Path::Differentiable && x.track_op() && !w.track_op() {
        matmul_frozen(x, w)?
    } else {
        matmul_transposed(x, w)?
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// RMS normalisation with a learned scale.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        Path::Differentiable if super::kernels::fused::supports(x) && !weight.track_op() => {
            super::kernels::fused::rms_norm(x, weight, eps)
        }
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

/// The MLP key `act(gate) ⊙ up` of a stacked `(rows, 2·width)` projection `[gate | up]`: one CPU kernel on the fast
/// path, one differentiable operation on the differentiable path (CPU, `f32`), composed operations otherwise.
pub fn gated_product(gate_up: &Tensor, width: usize, activation: GateActivation, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => gated_product_fast(gate_up, width, activation),
        Path::Differentiable if super::kernels::fused::supports(gate_up) => {
            super::kernels::fused::gated_product(gate_up, width, activation)
        }
        Path::Differentiable => {
            activation.composed(&gate_up.narrow(1, 0, width)?)? * gate_up.narrow(1, width, width)?
        }
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

/// Precomputed rotary tables, as tensors (composed path) and as plain values (the CPU attention kernel).
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    /// Shared, so that a copy of the tables (kept by a differentiable operation for its backward pass) is cheap.
    cos_values: std::sync::Arc<[f32]>,
    sin_values: std::sync::Arc<[f32]>,
    layout: RotaryLayout,
    rotary_dim: usize,
    base: f64,
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
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        Ok(Rotary {
            cos_values: cos.flatten_all()?.to_vec1::<f32>()?.into(),
            sin_values: sin.flatten_all()?.to_vec1::<f32>()?.into(),
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
            layout,
            rotary_dim,
            base: theta,
        })
    }

    /// The base (θ) the angles were computed from: tells apart the tables of layers with different bases.
    pub fn base(&self) -> f64 {
        self.base
    }

    /// Rotates packed rows `(rows, heads·head_dim)` in place, row `r` at position `positions[r]`.
    pub fn rotate_packed(&self, data: &mut [f32], heads: usize, head_dim: usize, positions: &[usize]) {
        self.turn_packed(data, heads, head_dim, positions, 1.0);
    }

    /// The inverse (and transpose) of [`rotate_packed`](Self::rotate_packed): carries a gradient with respect to
    /// rotated rows back to the unrotated ones.
    pub fn unrotate_packed(&self, data: &mut [f32], heads: usize, head_dim: usize, positions: &[usize]) {
        self.turn_packed(data, heads, head_dim, positions, -1.0);
    }

    /// Rotation by `direction` (±1) times each position's angles.
    fn turn_packed(&self, data: &mut [f32], heads: usize, head_dim: usize, positions: &[usize], direction: f32) {
        let half = self.rotary_dim / 2;
        for (row, &position) in data.chunks_exact_mut(heads * head_dim).zip(positions) {
            let cos = &self.cos_values[position * half..][..half];
            let sin = &self.sin_values[position * half..][..half];
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = match self.layout {
                        RotaryLayout::HalfSplit => (i, i + half),
                        RotaryLayout::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x, y, sin) = (head[a], head[b], direction * sin[i]);
                    head[a] = x * cos[i] - y * sin;
                    head[b] = y * cos[i] + x * sin;
                }
            }
        }
    }

    /// Rotates packed rows `x: (rows, heads·head_dim)`, row `r` at `positions[r]`, with composed (differentiable)
    /// operations.
    pub fn apply_at_rows(&self, x: &Tensor, positions: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables_at(positions)?;
        self.apply_with_tables(x, &cos, &sin, heads, head_dim)
    }

    /// The `(rows, 1, rotary_dim / 2)` cosine and sine tables for the given positions.
    pub fn tables_at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let rows = positions.dim(0)?;
        let half = self.rotary_dim / 2;
        let cos = self.cos.index_select(positions, 0)?.reshape((rows, 1, half))?;
        let sin = self.sin.index_select(positions, 0)?.reshape((rows, 1, half))?;
        Ok((cos, sin))
    }

    /// Like [`apply_at_rows`](Self::apply_at_rows) with tables from [`tables_at`](Self::tables_at).
    pub fn apply_with_tables(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let half = self.rotary_dim / 2;
        let x = x.reshape((rows, heads, head_dim))?;
        let rotating = x.narrow(2, 0, self.rotary_dim)?;
        let rotated = match self.layout {
            RotaryLayout::HalfSplit => {
                let (a, b) = (rotating.narrow(2, 0, half)?, rotating.narrow(2, half, half)?);
                let first = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
                let second = (b.broadcast_mul(cos)? + a.broadcast_mul(sin)?)?;
                Tensor::cat(&[first, second], 2)?
            }
            RotaryLayout::Interleaved => {
                let pairs = rotating.reshape((rows, heads, half, 2))?;
                let (a, b) = (pairs.narrow(3, 0, 1)?.squeeze(3)?, pairs.narrow(3, 1, 1)?.squeeze(3)?);
                let first = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
                let second = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
                Tensor::stack(&[first, second], 3)?.reshape((rows, heads, self.rotary_dim))?
            }
        };
        let rotated = if self.rotary_dim < head_dim {
            Tensor::cat(&[rotated, x.narrow(2, self.rotary_dim, head_dim - self.rotary_dim)?], 2)?
        } else {
            rotated
        };
        rotated.reshape((rows, heads * head_dim))
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

/// Shape of an attention layer: its heads, the scale of its scores and how far back a query sees.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Factor of the query-key scores (`1/√head_dim` unless the architecture says otherwise).
    pub scale: f32,
    /// Sliding window: the query at position `i` sees the keys at `j` with `i − window < j ≤ i`. None: all of
    /// `0..=i` (full causal attention).
    pub window: Option<usize>,
}

impl AttentionShape {
    /// Full causal attention with scores scaled by `1/√head_dim`.
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttentionShape { heads, kv_heads, head_dim, scale: 1.0 / (head_dim as f32).sqrt(), window: None }
    }

    /// The same shape with scores scaled by `scale`.
    pub fn with_scale(self, scale: f32) -> Self {
        AttentionShape { scale, ..self }
    }

    /// The same shape restricted to a sliding window of `window` keys (the query's own included).
    pub fn with_window(self, window: Option<usize>) -> Self {
        AttentionShape { window, ..self }
    }

    /// The first key position the query at `position` sees.
    #[inline(always)]
    pub fn first_visible(&self, position: usize) -> usize {
        match self.window {
            Some(window) => (position + 1).saturating_sub(window),
            None => 0,
        }
    }

    /// Whether the query at `query` sees the key at `key` (causal, and inside the window).
    #[inline(always)]
    pub fn sees(&self, query: usize, key: usize) -> bool {
        key <= query && key >= self.first_visible(query)
    }
}

/// Causal self-attention of packed `q: (rows, heads·d)`, `k, v: (rows, kv_heads·d)`, returning `(rows, heads·d)`.
///
/// The sequences are padded apart for the attention itself; `rotary` (if any) is applied to queries and keys there,
/// with positions counted from 0 in every sequence.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    packing: &Packing,
    shape: AttentionShape,
    rotary: Option<&Rotary>,
    path: Path,
) -> Result<Tensor> {
    if path == Path::Fast && super::kernels::generic::use_cpu_kernels(q.device()) && q.dtype() == DType::F32 {
        return super::kernels::attention_cpu::packed_causal_attention(q, k, v, packing, shape, rotary)
            .map_err(|e| candle_core::Error::Msg(e.to_string()));
    }
    let AttentionShape { heads, kv_heads, head_dim, .. } = shape;
    let (batch, tokens) = (packing.batch(), packing.longest());
    let split = |x: &Tensor, n: usize| -> Result<Tensor> {
        packing.pad(x)?.reshape((batch, tokens, n, head_dim))?.transpose(1, 2)?.contiguous()
    };
    let (mut q, mut k, v) = (split(q, heads)?, split(k, kv_heads)?, split(v, kv_heads)?);
    if let Some(rotary) = rotary {
        q = rotary.apply(&q, path)?;
        k = rotary.apply(&k, path)?;
    }
    let repeat = heads / kv_heads;
    let k = candle_transformers::utils::repeat_kv(k, repeat)?.contiguous()?;
    let v = candle_transformers::utils::repeat_kv(v, repeat)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * f64::from(shape.scale))?;
    let scores = scores.broadcast_add(&causal_mask(tokens, shape, scores.dtype(), q.device())?)?;
    let weights = softmax_last(&scores, path)?;
    let context = weights.matmul(&v)?.transpose(1, 2)?.reshape((batch, tokens, heads * head_dim))?;
    packing.unpad(&context)
}

/// `(t, t)` additive mask: 0 where query `i` sees key `j` ([`AttentionShape::sees`]), −∞ elsewhere.
pub fn causal_mask(tokens: usize, shape: AttentionShape, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..tokens)
        .flat_map(|i| (0..tokens).map(move |j| if shape.sees(i, j) { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (tokens, tokens), device)?.to_dtype(dtype)
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
