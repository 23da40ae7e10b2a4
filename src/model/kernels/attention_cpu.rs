//! The fast path's causal attention: one CPU kernel over packed rows, with no padding and no intermediate tensors.
//!
//! Going through candle, attention over a packed batch means padding every sequence to the longest, transposing,
//! repeating key/value heads, a batched matrix product of many tiny matrices, a mask, a softmax and the way back;
//! for short sentences that costs more than all the large matrix products of the layer together. This kernel reads
//! the packed `q`, `k`, `v` rows directly, applies the rotary embedding in place, and splits the work into blocks —
//! one key/value head, the query heads of its group at a run of positions of one sequence — that the tiled kernel
//! ([`super::tiled_attention`]) computes, blocks shared out across the cores (so one long document uses every core).
//! It has no backward pass: the differentiable path keeps the composed candle version, and the architecture tests
//! check both against the reference.

use candle_core::{DType, Tensor};

use super::fast_exp::with_simd;
use super::tiled_attention::{BLOCK_ROWS, KeyRows, Scratch, attend_block};
use crate::error::Result;
use crate::model::layers::{AttentionShape, Rotary};
use crate::model::packing::Packing;

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
    let blocks: Vec<(usize, usize, std::ops::Range<usize>)> = packing
        .lengths()
        .iter()
        .zip(crate::model::packing::offsets(packing.lengths()))
        .flat_map(|(&length, first_row)| {
            position_blocks(length, shape).map(move |(kv_head, positions)| (first_row, kv_head, positions))
        })
        .collect();
    let target = SharedOutput::new(&mut out);
    let q_width = heads * head_dim;
    let kv_width = kv_heads * head_dim;
    super::workers::for_each_item(blocks, |(first_row, kv_head, positions)| {
        let length = positions.end;
        let column = kv_head * head_dim;
        let keys = KeyRows::single(&k_values[first_row * kv_width..], length, kv_width, column, head_dim);
        let values = KeyRows::single(&v_values[first_row * kv_width..], length, kv_width, column, head_dim);
        let block = BlockRows::new(first_row, 0, positions, kv_head, shape);
        attend_positions(&q_values, &block, (&keys, &values), shape, &target, None);
    });
    Ok(Tensor::from_vec(out, (rows, q_width), q.device())?.to_dtype(q.dtype())?)
}

/// The runs `a..b` of consecutive positions of one sequence of `length` tokens whose query rows (every head of a
/// key/value head's group at each position) fill a block of the tiled kernel.
pub(crate) fn position_runs(length: usize, shape: AttentionShape) -> impl Iterator<Item = std::ops::Range<usize>> {
    let span = (BLOCK_ROWS / (shape.heads / shape.kv_heads)).max(1);
    (0..length).step_by(span).map(move |a| a..(a + span).min(length))
}

/// The blocks of one sequence of `length` tokens: every key/value head with each of its [`position_runs`].
pub(crate) fn position_blocks(
    length: usize,
    shape: AttentionShape,
) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> {
    (0..shape.kv_heads).flat_map(move |kv_head| position_runs(length, shape).map(move |run| (kv_head, run)))
}

/// The query rows of one block: every head of `kv_head`'s group at each position of a run, in position order. The
/// query of position `p` is packed row `first_row + p − offset` (`offset`: the position of the sequence's first row
/// there, non-zero for own rows after a cached prefix).
pub(crate) struct BlockRows {
    /// The position of each row of the block.
    pub positions: Vec<usize>,
    first_row: usize,
    offset: usize,
    kv_head: usize,
    group: usize,
}

impl BlockRows {
    pub(crate) fn new(
        first_row: usize,
        offset: usize,
        positions: std::ops::Range<usize>,
        kv_head: usize,
        shape: AttentionShape,
    ) -> Self {
        let group = shape.heads / shape.kv_heads;
        let positions = positions.flat_map(|p| std::iter::repeat_n(p, group)).collect();
        BlockRows { positions, first_row, offset, kv_head, group }
    }

    /// The packed row of block row `r`.
    #[inline(always)]
    pub(crate) fn row(&self, r: usize) -> usize {
        self.first_row + self.positions[r] - self.offset
    }

    /// The query head of block row `r`.
    #[inline(always)]
    pub(crate) fn head(&self, r: usize) -> usize {
        self.kv_head * self.group + r % self.group
    }
}

/// Attention of a block's query rows over `keys` and `values`, written into `target` (`(rows, heads·d)`) at the rows
/// the queries come from, and each row's log-sum-exp into `log_sums` (`(rows, heads)`) when given.
pub(crate) fn attend_positions(
    q: &[f32],
    block: &BlockRows,
    (keys, values): (&KeyRows, &KeyRows),
    shape: AttentionShape,
    target: &SharedOutput,
    log_sums: Option<&SharedOutput>,
) {
    let AttentionShape { heads, head_dim, .. } = shape;
    let offset_of = |r: usize| (block.row(r) * heads + block.head(r)) * head_dim;
    let mut block_sums = [0f32; super::tiled_attention::BLOCK_ROWS];
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        with_simd(
            #[inline(always)]
            || {
                attend_block(
                    |r| &q[offset_of(r)..][..head_dim],
                    &block.positions,
                    keys,
                    values,
                    shape,
                    &mut scratch,
                    // SAFETY: every (row, head) of the output belongs to exactly one block, and blocks are disjoint.
                    |r, row| unsafe { target.write(offset_of(r), row) },
                    log_sums.map(|_| &mut block_sums[..]),
                )
            },
        )
    });
    if let Some(log_sums) = log_sums {
        for r in 0..block.positions.len() {
            // SAFETY: as for the output, one block owns each (row, head).
            unsafe { log_sums.write(block.row(r) * heads + block.head(r), &block_sums[r..r + 1]) };
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// An output buffer that several threads fill at disjoint places.
pub(crate) struct SharedOutput {
    start: *mut f32,
    len: usize,
}

// SAFETY: writers promise disjoint ranges (see `write`); the buffer outlives every use (borrowed for 'a by `new`'s
// caller, which waits for the workers before reading it).
unsafe impl Sync for SharedOutput {}
unsafe impl Send for SharedOutput {}

impl SharedOutput {
    pub(crate) fn new(buffer: &mut [f32]) -> Self {
        SharedOutput { start: buffer.as_mut_ptr(), len: buffer.len() }
    }

    /// Copies `values` to `offset..offset + values.len()`.
    ///
    /// # Safety
    /// No other thread may write or read that range meanwhile.
    pub(crate) unsafe fn write(&self, offset: usize, values: &[f32]) {
        assert!(offset + values.len() <= self.len, "write beyond the output");
        // SAFETY: in bounds (checked), and the caller guarantees exclusive access to the range.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.start.add(offset), values.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_matches_composed_attention_with_and_without_a_window() {
        use crate::model::layers::{Path, RotaryLayout, causal_attention};
        use candle_core::Device;
        let device = Device::Cpu;
        let rotary = Rotary::new(8, 10_000.0, 256, RotaryLayout::HalfSplit, DType::F32, &device).unwrap();
        // A 150-token sequence spans several blocks of positions and of keys.
        let packing = Packing::new(&[5, 9, 1, 150], &device).unwrap();
        let q = Tensor::randn(0f32, 1.0, (165, 32), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (165, 16), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (165, 16), &device).unwrap();
        for window in [None, Some(1), Some(3), Some(9), Some(70)] {
            let shape = AttentionShape::new(4, 2, 8).with_window(window).with_scale(0.3);
            let ours = packed_causal_attention(&q, &k, &v, &packing, shape, Some(&rotary)).unwrap();
            let composed = causal_attention(&q, &k, &v, &packing, shape, Some(&rotary), Path::Differentiable).unwrap();
            let difference =
                (ours - composed).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>();
            assert!(difference.unwrap() < 1e-5, "window {window:?}");
        }
    }
}
