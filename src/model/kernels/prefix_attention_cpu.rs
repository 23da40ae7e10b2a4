//! Attention over a cached prefix as one CPU operation with a hand-written backward pass.
//!
//! ROME and MEMIT recompute, at every optimisation step, only the tokens from each prompt's subject on; their
//! attention reads the other tokens' keys and values from a [`crate::model::prefix::PrefixCache`]. Composed from candle
//! operations that attention is a gather of prefix and own keys, a repeat of key/value heads, padding, two batched
//! products of tiny matrices, a mask and a softmax, and a backward pass through each: on the default model it took
//! more of a step than the layer's large matrix products. This operation reads the packed rows directly and runs in
//! tiles ([`super::tiled_attention`]) both ways: the forward keeps each row's log-sum-exp, and the backward recomputes
//! the attention weights `p` block by block from it and applies
//!
//! `∂s_j = p_j (∂o·v_j − ∂o·o)`, then `∂q = c Σ_j ∂s_j k_j` (`c` the score scale, usually `1/√d`), and for the
//! sequence's own keys and values `∂k_j += c Σ ∂s_j q`, `∂v_j += Σ p_j ∂o`, the sums running over the queries that
//! see the key (all later ones, or those whose sliding window reaches it),
//!
//! and finally rotates the query and key gradients back (the rotary embedding is orthogonal, so its transpose is the
//! inverse rotation). Prefix keys and values are constants. Work items are (sequence, key/value head) pairs shared
//! out over the worker pool; each owns its rows' gradients, so results do not depend on timing.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::attention_cpu::{BlockRows, SharedOutput, attend_positions, position_blocks, position_runs};
use super::fast_exp::{cpu_f32_values as values_of, with_simd};
use super::tiled_attention::{BackwardScratch, KeyRows, attend_block_backward};
use crate::error::Result;
use crate::model::layers::{AttentionShape, Rotary};
use crate::model::packing::offsets;

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
        log_sums: Vec::new(),
    };
    let (mut q_rotated, mut k_rotated) = (values_of(&q)?, values_of(&k)?);
    op.rotate(&mut q_rotated, &mut k_rotated);
    let (value, log_sums) = op.forward(&q_rotated, &k_rotated, &values_of(&v)?);
    Ok(q.apply_op3(&k, &v, PrefixAttention { value, log_sums, ..op })?)
}

struct PrefixAttention {
    prefix_k: Vec<f32>,
    prefix_v: Vec<f32>,
    geometry: PrefixGeometry,
    rotary: Option<Rotary>,
    /// The forward value, computed before the op is recorded.
    value: Vec<f32>,
    /// Each own row's and head's log-sum-exp of its scaled scores `(rows, heads)`, kept for the backward pass.
    log_sums: Vec<f32>,
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

    /// Sequence `s`'s keys and values for `kv_head` (prefix rows, then own rows) from own rows `k` and `v`; its
    /// first prefix row and first own row are `prefix_first` and `first_row`.
    fn key_rows<'a>(
        &'a self,
        (s, kv_head): (usize, usize),
        (prefix_first, first_row): (usize, usize),
        (k, v): (&'a [f32], &'a [f32]),
    ) -> (KeyRows<'a>, KeyRows<'a>) {
        let g = &self.geometry;
        let AttentionShape { kv_heads, head_dim, .. } = g.shape;
        let kv_width = kv_heads * head_dim;
        let (start, length) = (g.starts[s], g.lengths[s]);
        let prefix = prefix_first * kv_width..(prefix_first + start) * kv_width;
        let own = first_row * kv_width..(first_row + length) * kv_width;
        let column = kv_head * head_dim;
        let rows = |cached: &'a [f32], own_values: &'a [f32]| KeyRows {
            parts: [(&cached[prefix.clone()], start), (&own_values[own.clone()], length)],
            width: kv_width,
            column,
            head_dim,
        };
        (rows(&self.prefix_k, k), rows(&self.prefix_v, v))
    }

    /// The context rows `(rows, heads·d)` and log-sum-exps `(rows, heads)` from rotated `q`, `k` and plain `v`, in
    /// tiles ([`super::tiled_attention`]): per sequence and key/value head, runs of own positions over the prefix
    /// and own keys they see.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let g = &self.geometry;
        let AttentionShape { heads, head_dim, .. } = g.shape;
        let rows: usize = g.lengths.iter().sum();
        let (mut out, mut log_sums) = (vec![0f32; rows * heads * head_dim], vec![0f32; rows * heads]);
        let (prefix_offsets, row_offsets) = (g.prefix_offsets(), g.row_offsets());
        let blocks: Vec<(usize, usize, Range<usize>)> = (0..g.lengths.len())
            .flat_map(|s| position_blocks(g.lengths[s], g.shape).map(move |(kv_head, own)| (s, kv_head, own)))
            .collect();
        let (target, sums) = (SharedOutput::new(&mut out), SharedOutput::new(&mut log_sums));
        super::workers::for_each_item(blocks, |(s, kv_head, own)| {
            let start = g.starts[s];
            let (keys, values) = self.key_rows((s, kv_head), (prefix_offsets[s], row_offsets[s]), (k, v));
            let block = BlockRows::new(row_offsets[s], start, start + own.start..start + own.end, kv_head, g.shape);
            attend_positions(q, &block, (&keys, &values), g.shape, &target, Some(&sums));
        });
        (out, log_sums)
    }

    /// Gradients with respect to rotated `q`, rotated `k` and `v`, given the output gradient, in tiles: one work item
    /// per sequence and key/value head (it owns that head's key and value gradients of the sequence's own rows), its
    /// runs of positions one after the other.
    fn backward(&self, q: &[f32], k: &[f32], v: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let g = &self.geometry;
        let AttentionShape { heads, kv_heads, head_dim, .. } = g.shape;
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let rows_total: usize = g.lengths.iter().sum();
        let (mut dq, mut dk, mut dv) =
            (vec![0f32; rows_total * q_width], vec![0f32; rows_total * kv_width], vec![0f32; rows_total * kv_width]);
        let (dq_out, dk_out, dv_out) =
            (SharedOutput::new(&mut dq), SharedOutput::new(&mut dk), SharedOutput::new(&mut dv));
        let (prefix_offsets, row_offsets) = (g.prefix_offsets(), g.row_offsets());
        let items: Vec<(usize, usize)> =
            (0..g.lengths.len()).flat_map(|s| (0..kv_heads).map(move |kv_head| (s, kv_head))).collect();
        super::workers::for_each_item(items, |(s, kv_head)| {
            let (start, length, first_row) = (g.starts[s], g.lengths[s], row_offsets[s]);
            let (keys, values) = self.key_rows((s, kv_head), (prefix_offsets[s], first_row), (k, v));
            let (mut key_grads, mut value_grads) = (vec![0f32; length * head_dim], vec![0f32; length * head_dim]);
            for own in position_runs(length, g.shape) {
                let block = BlockRows::new(first_row, start, start + own.start..start + own.end, kv_head, g.shape);
                let at = |r: usize| (block.row(r) * heads + block.head(r)) * head_dim;
                let log_sums: Vec<f32> =
                    (0..block.positions.len()).map(|r| self.log_sums[block.row(r) * heads + block.head(r)]).collect();
                BACKWARD_SCRATCH.with(|scratch| {
                    with_simd(
                        #[inline(always)]
                        || {
                            attend_block_backward(
                                (
                                    |r| &q[at(r)..][..head_dim],
                                    |r| &grad[at(r)..][..head_dim],
                                    |r| &self.value[at(r)..][..head_dim],
                                ),
                                &log_sums,
                                &block.positions,
                                (&keys, &values),
                                g.shape,
                                &mut scratch.borrow_mut(),
                                // SAFETY: one item owns every (row, head) of its sequence and key/value head.
                                |r, row| unsafe { dq_out.write(at(r), row) },
                                (start, &mut key_grads, &mut value_grads),
                            )
                        },
                    )
                });
            }
            for i in 0..length {
                let at = (first_row + i) * kv_width + kv_head * head_dim;
                // SAFETY: as above, for the key/value head's columns of the sequence's own rows.
                unsafe {
                    dk_out.write(at, &key_grads[i * head_dim..(i + 1) * head_dim]);
                    dv_out.write(at, &value_grads[i * head_dim..(i + 1) * head_dim]);
                }
            }
        });
        (dq, dk, dv)
    }
}

thread_local! {
    static BACKWARD_SCRATCH: std::cell::RefCell<BackwardScratch> = std::cell::RefCell::new(BackwardScratch::default());
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
        check_against_composed_attention(None, vec![3, 1, 4], vec![2, 3, 1]);
    }

    #[test]
    fn a_sliding_window_gives_what_the_masked_composed_attention_gives() {
        // A window of 3 cuts into every sequence below (totals 5, 4, 5), in the prefix and in the own rows.
        check_against_composed_attention(Some(3), vec![3, 1, 4], vec![2, 3, 1]);
    }

    #[test]
    fn long_sequences_span_several_query_and_key_blocks() {
        // 150 and 130 positions: several blocks of 32 positions (2 heads per group) and of 64 keys, with and without
        // a window that leaves whole key blocks out.
        check_against_composed_attention(None, vec![70, 0], vec![80, 130]);
        check_against_composed_attention(Some(50), vec![70, 0], vec![80, 130]);
    }

    fn check_against_composed_attention(window: Option<usize>, starts: Vec<usize>, own: Vec<usize>) {
        let device = Device::Cpu;
        let shape = AttentionShape::new(4, 2, 8).with_window(window);
        let rotary = Rotary::new(8, 10_000.0, 256, RotaryLayout::HalfSplit, DType::F32, &device).unwrap();
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
