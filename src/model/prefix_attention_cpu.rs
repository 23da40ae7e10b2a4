//! Attention over a cached prefix as one CPU operation with a hand-written backward pass.
//!
//! ROME and MEMIT recompute, at every optimisation step, only the tokens from each prompt's subject on; their
//! attention reads the other tokens' keys and values from a [`super::prefix::PrefixCache`]. Composed from candle
//! operations that attention is a gather of prefix and own keys, a repeat of key/value heads, padding, two batched
//! products of tiny matrices, a mask and a softmax, and a backward pass through each: on the default model it took
//! more of a step than the layer's large matrix products. This operation reads the packed rows directly (as the fast
//! path's [`super::attention_cpu`] does), and its backward recomputes each query's attention weights `p` and applies
//!
//! `∂s_j = p_j (∂p_j − Σ_l p_l ∂p_l)` with `∂p_j = ∂o · v_j`, then `∂q = c Σ_j ∂s_j k_j` (`c` the score scale, usually
//! `1/√d`), and for the sequence's own keys and values `∂k_j += c ∂s_j q`, `∂v_j += p_j ∂o`, the sums running over the
//! keys the query sees (all earlier ones, or those of its sliding window),
//!
//! and finally rotates the query and key gradients back (the rotary embedding is orthogonal, so its transpose is the
//! inverse rotation). Prefix keys and values are constants. Sequences are shared out over the worker pool; each
//! sequence's rows are written by one thread only, so results do not depend on timing.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::attention_cpu::{SharedOutput, attend_positions, dot, position_blocks, share_out};
use super::fast_exp::{cpu_f32_values as values_of, exp_f32, with_simd};
use super::layers::{AttentionShape, Rotary};
use super::tiled_attention::KeyRows;
use crate::error::Result;

/// Where every sequence's rows lie: its prefix rows in the cache and its own rows in the packed batch.
#[derive(Clone)]
pub struct PrefixGeometry {
    /// Prefix length (= position of the first own token) per sequence.
    pub starts: Vec<usize>,
    /// Own (recomputed) tokens per sequence.
    pub lengths: Vec<usize>,
    /// The attention layout.
    pub shape: AttentionShape,
}

impl PrefixGeometry {
    fn prefix_offsets(&self) -> Vec<usize> {
        offsets(&self.starts)
    }

    fn row_offsets(&self) -> Vec<usize> {
        offsets(&self.lengths)
    }

    /// Each own row's position in its sequence.
    fn positions(&self) -> Vec<usize> {
        self.starts.iter().zip(&self.lengths).flat_map(|(&s, &l)| s..s + l).collect()
    }

    /// Consecutive ranges of sequences of about equal attention cost, one per thread.
    fn shares(&self) -> Vec<(usize, usize)> {
        let costs: Vec<usize> = self.starts.iter().zip(&self.lengths).map(|(&s, &l)| (s + l) * l).collect();
        share_out(&costs, super::workers::threads())
    }
}

fn offsets(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |total, &count| {
            let start = *total;
            *total += count;
            Some(start)
        })
        .collect()
}

/// Attention of packed `q: (rows, heads·d)`, `k, v: (rows, kv_heads·d)` (unrotated, `f32` on the CPU) over the cached,
/// rotated `prefix_k` and `prefix_v` and the causal own rows; differentiable in `q`, `k` and `v`.
pub fn prefix_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (prefix_k, prefix_v): (&Tensor, &Tensor),
    geometry: &PrefixGeometry,
    rotary: Option<&Rotary>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = PrefixAttention {
        prefix_k: values_of(prefix_k)?,
        prefix_v: values_of(prefix_v)?,
        geometry: geometry.clone(),
        rotary: rotary.cloned(),
        value: Vec::new(),
    };
    let (mut q_rotated, mut k_rotated) = (values_of(&q)?, values_of(&k)?);
    op.rotate(&mut q_rotated, &mut k_rotated);
    let value = op.forward(&q_rotated, &k_rotated, &values_of(&v)?);
    Ok(q.apply_op3(&k, &v, PrefixAttention { value, ..op })?)
}

struct PrefixAttention {
    prefix_k: Vec<f32>,
    prefix_v: Vec<f32>,
    geometry: PrefixGeometry,
    rotary: Option<Rotary>,
    /// The forward value, computed before the op is recorded.
    value: Vec<f32>,
}

/// One sequence's view of the keys or values it attends to: its prefix rows, then its own rows.
#[derive(Clone, Copy)]
struct Rows<'a> {
    prefix: &'a [f32],
    own: &'a [f32],
    start: usize,
    width: usize,
    column: usize,
    head_dim: usize,
}

impl<'a> Rows<'a> {
    /// Rows `ranges.0` of the cache and `ranges.1` of the batch, read at `column..column + head_dim`.
    fn new(
        cached: &'a [f32],
        own: &'a [f32],
        ranges: (std::ops::Range<usize>, std::ops::Range<usize>),
        start: usize,
        width: usize,
        column: usize,
        head_dim: usize,
    ) -> Self {
        Rows { prefix: &cached[ranges.0], own: &own[ranges.1], start, width, column, head_dim }
    }

    #[inline(always)]
    fn get(&self, j: usize) -> &[f32] {
        let (rows, j) = if j < self.start { (self.prefix, j) } else { (self.own, j - self.start) };
        &rows[j * self.width + self.column..][..self.head_dim]
    }
}

impl PrefixAttention {
    fn rotate(&self, q: &mut [f32], k: &mut [f32]) {
        if let Some(rotary) = &self.rotary {
            let AttentionShape { heads, kv_heads, head_dim, .. } = self.geometry.shape;
            let positions = self.geometry.positions();
            rotary.rotate_packed(q, heads, head_dim, &positions);
            rotary.rotate_packed(k, kv_heads, head_dim, &positions);
        }
    }

    /// The attention weights of one query over the keys `seen` it sees, into `weights[seen]` (a sliding window
    /// starts `seen` after 0; the keys before it are skipped, not masked).
    #[inline(always)]
    fn weights(query: &[f32], keys: &Rows, seen: Range<usize>, scale: f32, weights: &mut [f32]) {
        let mut max = f32::NEG_INFINITY;
        for (j, weight) in seen.clone().zip(weights[seen.clone()].iter_mut()) {
            *weight = dot(query, keys.get(j)) * scale;
            max = max.max(*weight);
        }
        let mut total = 0f32;
        for weight in weights[seen.clone()].iter_mut() {
            *weight = exp_f32(*weight - max);
            total += *weight;
        }
        for weight in weights[seen].iter_mut() {
            *weight /= total;
        }
    }

    /// Calls `visit` for every sequence, head and own token of sequences `first..last`, in that order.
    fn visit_queries<'a>(
        &'a self,
        (first, last): (usize, usize),
        k: &'a [f32],
        v: &'a [f32],
        mut visit: impl FnMut(&Query<'a>),
    ) {
        let g = &self.geometry;
        let AttentionShape { heads, kv_heads, head_dim, .. } = g.shape;
        let kv_width = kv_heads * head_dim;
        let (prefix_offsets, row_offsets) = (g.prefix_offsets(), g.row_offsets());
        for s in first..last {
            let (start, rows) = (g.starts[s], row_offsets[s]);
            let prefix = prefix_offsets[s] * kv_width..(prefix_offsets[s] + start) * kv_width;
            let own = rows * kv_width..(rows + g.lengths[s]) * kv_width;
            for head in 0..heads {
                let column = head / (heads / kv_heads) * head_dim;
                let view = |cached, own_values| {
                    Rows::new(cached, own_values, (prefix.clone(), own.clone()), start, kv_width, column, head_dim)
                };
                let (keys, values) = (view(&self.prefix_k, k), view(&self.prefix_v, v));
                for i in 0..g.lengths[s] {
                    let local_first = rows - row_offsets[first];
                    visit(&Query { row: rows + i, local_first, i, head, start, keys, values });
                }
            }
        }
    }

    /// Scratch space for the attention weights of the longest sequence in `first..last`.
    fn scratch(&self, (first, last): (usize, usize)) -> Vec<f32> {
        let g = &self.geometry;
        vec![0f32; (first..last).map(|s| g.starts[s] + g.lengths[s]).max().unwrap_or(0)]
    }

    /// The context rows `(rows, heads·d)` from rotated `q`, `k` and plain `v`, in tiles
    /// ([`super::tiled_attention`]): per sequence and key/value head, runs of own positions over the prefix and own
    /// keys they see.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let g = &self.geometry;
        let AttentionShape { heads, kv_heads, head_dim, .. } = g.shape;
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let mut out = vec![0f32; g.lengths.iter().sum::<usize>() * q_width];
        let (prefix_offsets, row_offsets) = (g.prefix_offsets(), g.row_offsets());
        let blocks: Vec<(usize, usize, Range<usize>)> = (0..g.lengths.len())
            .flat_map(|s| position_blocks(g.lengths[s], g.shape).map(move |(kv_head, own)| (s, kv_head, own)))
            .collect();
        let target = SharedOutput::new(&mut out);
        super::workers::for_each_item(blocks, |(s, kv_head, own)| {
            let (start, length, first_row) = (g.starts[s], g.lengths[s], row_offsets[s]);
            let prefix = prefix_offsets[s] * kv_width..(prefix_offsets[s] + start) * kv_width;
            let own_rows = first_row * kv_width..(first_row + length) * kv_width;
            let column = kv_head * head_dim;
            let keys = KeyRows {
                parts: [(&self.prefix_k[prefix.clone()], start), (&k[own_rows.clone()], length)],
                width: kv_width,
                column,
                head_dim,
            };
            let values = KeyRows {
                parts: [(&self.prefix_v[prefix], start), (&v[own_rows], length)],
                width: kv_width,
                column,
                head_dim,
            };
            let positions = start + own.start..start + own.end;
            attend_positions(q, first_row, start, positions, kv_head, (&keys, &values), g.shape, &target);
        });
        out
    }

    /// Gradients with respect to rotated `q`, rotated `k` and `v`, given the output gradient.
    fn backward(&self, q: &[f32], k: &[f32], v: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let g = &self.geometry;
        let AttentionShape { heads, kv_heads, head_dim, scale, .. } = g.shape;
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let rows_total: usize = g.lengths.iter().sum();
        let (mut dq, mut dk, mut dv) =
            (vec![0f32; rows_total * q_width], vec![0f32; rows_total * kv_width], vec![0f32; rows_total * kv_width]);
        let pieces: Vec<_> = split_rows(&mut dq, g, q_width)
            .into_iter()
            .zip(split_rows(&mut dk, g, kv_width))
            .zip(split_rows(&mut dv, g, kv_width))
            .map(|(((first, last, dq), (_, _, dk)), (_, _, dv))| (first, last, dq, dk, dv))
            .collect();
        super::workers::for_each_item(pieces, |(first, last, dq, dk, dv)| {
            with_simd(|| {
                let (mut weights, mut slopes) = (self.scratch((first, last)), self.scratch((first, last)));
                self.visit_queries((first, last), k, v, |query| {
                    let at = query.row * q_width + query.head * head_dim;
                    let (query_row, out_grad) = (&q[at..][..head_dim], &grad[at..][..head_dim]);
                    let (start, seen) = (query.start, query.seen(&g.shape));
                    Self::weights(query_row, &query.keys, seen.clone(), scale, &mut weights);
                    let mut weighted = 0f32;
                    for (j, slope) in seen.clone().zip(slopes[seen.clone()].iter_mut()) {
                        *slope = dot(out_grad, query.values.get(j));
                        weighted += weights[j] * *slope;
                    }
                    let local = (query.local_first + query.i) * q_width + query.head * head_dim;
                    let query_grad = &mut dq[local..][..head_dim];
                    for j in seen.clone() {
                        let score_grad = weights[j] * (slopes[j] - weighted) * scale;
                        for (d, &x) in query_grad.iter_mut().zip(query.keys.get(j)) {
                            *d += score_grad * x;
                        }
                        if j >= start {
                            let own_row = (query.local_first + j - start) * kv_width + query.keys.column;
                            for (d, &x) in dk[own_row..][..head_dim].iter_mut().zip(query_row) {
                                *d += score_grad * x;
                            }
                            for (d, &x) in dv[own_row..][..head_dim].iter_mut().zip(out_grad) {
                                *d += weights[j] * x;
                            }
                        }
                    }
                });
            })
        });
        (dq, dk, dv)
    }
}

/// One query of [`PrefixAttention::visit_queries`].
struct Query<'a> {
    /// Its packed row in the batch.
    row: usize,
    /// The row of its sequence's first own token within the thread's piece of the output.
    local_first: usize,
    /// Its index among its sequence's own tokens.
    i: usize,
    /// Its head.
    head: usize,
    /// Its sequence's prefix length.
    start: usize,
    /// The keys it attends to (prefix, then own).
    keys: Rows<'a>,
    /// The values, likewise.
    values: Rows<'a>,
}

impl Query<'_> {
    /// The key positions this query sees: up to its own position `start + i`, from the start of its window.
    fn seen(&self, shape: &AttentionShape) -> Range<usize> {
        let position = self.start + self.i;
        shape.first_visible(position)..position + 1
    }
}

/// The rows of consecutive sequence ranges (one per thread) as disjoint slices of `out`.
fn split_rows<'a>(out: &'a mut [f32], g: &PrefixGeometry, width: usize) -> Vec<(usize, usize, &'a mut [f32])> {
    let mut pieces = Vec::new();
    let mut rest = out;
    for (first, last) in g.shares() {
        let rows: usize = g.lengths[first..last].iter().sum();
        let (mine, others) = std::mem::take(&mut rest).split_at_mut(rows * width);
        rest = others;
        pieces.push((first, last, mine));
    }
    pieces
}

impl CustomOp3 for PrefixAttention {
    fn name(&self) -> &'static str {
        "prefix-attention"
    }

    fn cpu_fwd(
        &self,
        _q: &CpuStorage,
        _q_layout: &Layout,
        _k: &CpuStorage,
        _k_layout: &Layout,
        _v: &CpuStorage,
        _v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let AttentionShape { heads, head_dim, .. } = self.geometry.shape;
        let rows: usize = self.geometry.lengths.iter().sum();
        Ok((CpuStorage::F32(self.value.clone()), Shape::from((rows, heads * head_dim))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (mut q_rotated, mut k_rotated) = (values_of(q)?, values_of(k)?);
        self.rotate(&mut q_rotated, &mut k_rotated);
        let (mut dq, mut dk, dv) = self.backward(&q_rotated, &k_rotated, &values_of(v)?, &values_of(grad_res)?);
        if let Some(rotary) = &self.rotary {
            let AttentionShape { heads, kv_heads, head_dim, .. } = self.geometry.shape;
            let positions = self.geometry.positions();
            rotary.unrotate_packed(&mut dq, heads, head_dim, &positions);
            rotary.unrotate_packed(&mut dk, kv_heads, head_dim, &positions);
        }
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::{Path, RotaryLayout, causal_attention};
    use crate::model::packing::Packing;
    use candle_core::{DType, Device, IndexOp, Var};

    /// Rows `from..to` of every sequence of a packed `(rows, width)` tensor, packed again.
    fn take_rows(x: &Tensor, lengths: &[usize], pick: impl Fn(usize, usize) -> bool) -> Tensor {
        let mut rows = Vec::new();
        let mut offset = 0;
        for (s, &length) in lengths.iter().enumerate() {
            rows.extend((0..length).filter(|&j| pick(s, j)).map(|j| x.i(offset + j).unwrap().unsqueeze(0).unwrap()));
            offset += length;
        }
        Tensor::cat(&rows, 0).unwrap()
    }

    #[test]
    fn value_and_gradients_match_composed_attention_over_whole_sequences() {
        check_against_composed_attention(None);
    }

    #[test]
    fn a_sliding_window_gives_what_the_masked_composed_attention_gives() {
        // A window of 3 cuts into every sequence below (totals 5, 4, 5), in the prefix and in the own rows.
        check_against_composed_attention(Some(3));
    }

    fn check_against_composed_attention(window: Option<usize>) {
        let device = Device::Cpu;
        let shape = AttentionShape::new(4, 2, 8).with_window(window);
        let rotary = Rotary::new(8, 10_000.0, 64, RotaryLayout::HalfSplit, DType::F32, &device).unwrap();
        let (starts, own) = (vec![3usize, 1, 4], vec![2usize, 3, 1]);
        let totals: Vec<usize> = starts.iter().zip(&own).map(|(s, l)| s + l).collect();
        let rows: usize = totals.iter().sum();
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, 32), &device).unwrap()).unwrap();
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, 16), &device).unwrap()).unwrap();
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, 16), &device).unwrap()).unwrap();
        let weighting = Tensor::randn(0f32, 1.0, (own.iter().sum::<usize>(), 32), &device).unwrap();

        // Reference: composed attention over the whole sequences, restricted to the own rows.
        let packing = Packing::new(&totals, &device).unwrap();
        let full = causal_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &packing,
            shape,
            Some(&rotary),
            Path::Differentiable,
        )
        .unwrap();
        let is_own = |s: usize, j: usize| j >= starts[s];
        let expected = take_rows(&full, &totals, is_own);
        let expected_grads = (&expected * &weighting).unwrap().sum_all().unwrap().backward().unwrap();

        // The operation: prefix keys (rotated) and values from the leading rows, own rows as inputs.
        let in_prefix = |s: usize, j: usize| j < starts[s];
        let mut prefix_k =
            take_rows(k.as_tensor(), &totals, in_prefix).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let positions: Vec<usize> = starts.iter().flat_map(|&s| 0..s).collect();
        rotary.rotate_packed(&mut prefix_k, 2, 8, &positions);
        let prefix_k = Tensor::from_vec(prefix_k, (positions.len(), 16), &device).unwrap();
        let prefix_v = take_rows(v.as_tensor(), &totals, in_prefix);
        let (q_own, k_own, v_own) = (
            take_rows(q.as_tensor(), &totals, is_own),
            take_rows(k.as_tensor(), &totals, is_own),
            take_rows(v.as_tensor(), &totals, is_own),
        );
        let geometry = PrefixGeometry { starts: starts.clone(), lengths: own.clone(), shape };
        let got = prefix_attention(&q_own, &k_own, &v_own, (&prefix_k, &prefix_v), &geometry, Some(&rotary)).unwrap();
        let difference = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(difference(&got, &expected) < 1e-5, "values differ");
        let grads = (&got * &weighting).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            // Gradients reach the own rows through the operation; compare them there.
            let ours = take_rows(grads.get(var.as_tensor()).unwrap(), &totals, is_own);
            let reference = take_rows(expected_grads.get(var.as_tensor()).unwrap(), &totals, is_own);
            assert!(difference(&ours, &reference) < 1e-4, "{name} gradients differ");
        }
    }
}
