//! The fast path's causal attention: one CPU kernel over packed rows, with no padding and no intermediate tensors.
//!
//! Going through candle, attention over a packed batch means padding every sequence to the longest, transposing,
//! repeating key/value heads, a batched matrix product of many tiny matrices, a mask, a softmax and the way back;
//! for short sentences that costs more than all the large matrix products of the layer together. This kernel reads
//! the packed `q`, `k`, `v` rows directly, applies the rotary embedding in place, and for every sequence, head and
//! query computes the causal softmax-weighted sum of values in f32, sequences shared out across the cores. It has no
//! backward pass: the differentiable path keeps the composed candle version, and the architecture tests check both
//! against the reference.

use candle_core::{DType, Tensor};

use super::fast_exp::{exp_f32, with_simd};
use super::layers::{AttentionShape, Rotary};
use super::packing::Packing;
use crate::error::Result;

/// Causal attention of packed f32 rows `q: (rows, heads·d)`, `k, v: (rows, kv_heads·d)` → `(rows, heads·d)`.
pub fn packed_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    packing: &Packing,
    shape: AttentionShape,
    rotary: Option<&Rotary>,
) -> Result<Tensor> {
    let AttentionShape { heads, kv_heads, head_dim, .. } = shape;
    let rows = packing.rows();
    let read = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let (mut q_values, mut k_values, v_values) = (read(q)?, read(k)?, read(v)?);
    let positions: Vec<usize> = packing.lengths().iter().flat_map(|&length| 0..length).collect();
    if let Some(rotary) = rotary {
        rotary.rotate_packed(&mut q_values, heads, head_dim, &positions);
        rotary.rotate_packed(&mut k_values, kv_heads, head_dim, &positions);
    }
    let mut out = vec![0f32; rows * heads * head_dim];
    let kernel = Kernel { q: &q_values, k: &k_values, v: &v_values, shape };
    let mut pieces = Vec::new();
    let mut rest: &mut [f32] = &mut out;
    let costs: Vec<usize> = packing.lengths().iter().map(|l| l * l).collect();
    for (first, last) in share_out(&costs, super::workers::threads()) {
        let offset: usize = packing.lengths()[..first].iter().sum();
        let lengths = &packing.lengths()[first..last];
        let (mine, others) = rest.split_at_mut(lengths.iter().sum::<usize>() * heads * head_dim);
        rest = others;
        pieces.push((offset, lengths, mine));
    }
    super::workers::for_each_item(pieces, |(offset, lengths, mine)| {
        with_simd(|| kernel.sequences(offset, lengths, mine))
    });
    Ok(Tensor::from_vec(out, (rows, heads * head_dim), q.device())?.to_dtype(q.dtype())?)
}

/// Splits sequences into at most `threads` consecutive ranges of roughly equal total `costs` (e.g. length²).
pub(crate) fn share_out(costs: &[usize], threads: usize) -> Vec<(usize, usize)> {
    let cost: usize = costs.iter().sum();
    let target = cost.div_ceil(threads.max(1)).max(1);
    let mut ranges = Vec::new();
    let (mut start, mut accumulated) = (0, 0);
    for (index, cost) in costs.iter().enumerate() {
        accumulated += cost;
        if accumulated >= target && ranges.len() + 1 < threads {
            ranges.push((start, index + 1));
            start = index + 1;
            accumulated = 0;
        }
    }
    if start < costs.len() {
        ranges.push((start, costs.len()));
    }
    ranges
}

struct Kernel<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    shape: AttentionShape,
}

impl Kernel<'_> {
    /// Attention for consecutive sequences starting at packed row `offset`, written into `out` (their rows only).
    #[inline(always)]
    fn sequences(&self, offset: usize, lengths: &[usize], out: &mut [f32]) {
        let AttentionShape { heads, kv_heads, head_dim, scale, .. } = self.shape;
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let group = heads / kv_heads;
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let mut weights = vec![0f32; longest];
        let mut first_row = offset;
        let mut local_row = 0;
        for &length in lengths {
            for head in 0..heads {
                let kv_column = (head / group) * head_dim;
                for i in 0..length {
                    // Keys outside a sliding window are skipped, not masked: the loops start at the first visible.
                    let first = self.shape.first_visible(i);
                    let query = &self.q[(first_row + i) * q_width + head * head_dim..][..head_dim];
                    let mut max = f32::NEG_INFINITY;
                    for (j, weight) in (first..=i).zip(weights[first..=i].iter_mut()) {
                        let key = &self.k[(first_row + j) * kv_width + kv_column..][..head_dim];
                        *weight = dot(query, key) * scale;
                        max = max.max(*weight);
                    }
                    let mut total = 0f32;
                    for weight in weights[first..=i].iter_mut() {
                        *weight = exp_f32(*weight - max);
                        total += *weight;
                    }
                    let target = &mut out[(local_row + i) * q_width + head * head_dim..][..head_dim];
                    target.fill(0.0);
                    for (j, &weight) in (first..=i).zip(weights[first..=i].iter()) {
                        let value = &self.v[(first_row + j) * kv_width + kv_column..][..head_dim];
                        let p = weight / total;
                        for (t, &x) in target.iter_mut().zip(value) {
                            *t += p * x;
                        }
                    }
                }
            }
            first_row += length;
            local_row += length;
        }
    }
}

/// Dot product with 16 independent accumulators, so that it vectorises.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_all_sequences_in_order() {
        let ranges = share_out(&[100, 1, 1, 100, 9], 2);
        assert_eq!(ranges.first().unwrap().0, 0);
        assert_eq!(ranges.last().unwrap().1, 5);
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].1, pair[1].0);
        }
        assert_eq!(share_out(&[4], 8), vec![(0, 1)]);
    }

    #[test]
    fn the_kernel_matches_composed_attention_with_and_without_a_window() {
        use crate::model::layers::{Path, RotaryLayout, causal_attention};
        use candle_core::Device;
        let device = Device::Cpu;
        let rotary = Rotary::new(8, 10_000.0, 64, RotaryLayout::HalfSplit, DType::F32, &device).unwrap();
        let packing = Packing::new(&[5, 9, 1], &device).unwrap();
        let q = Tensor::randn(0f32, 1.0, (15, 32), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (15, 16), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (15, 16), &device).unwrap();
        for window in [None, Some(1), Some(3), Some(9)] {
            let shape = AttentionShape::new(4, 2, 8).with_window(window).with_scale(0.3);
            let ours = packed_causal_attention(&q, &k, &v, &packing, shape, Some(&rotary)).unwrap();
            let composed = causal_attention(&q, &k, &v, &packing, shape, Some(&rotary), Path::Differentiable).unwrap();
            let difference =
                (ours - composed).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>();
            assert!(difference.unwrap() < 1e-5, "window {window:?}");
        }
    }
}
