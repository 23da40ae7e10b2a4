//! The small matrix products inside one (query block, key block) tile of [`super::tiled_attention`], and the copies
//! that lay their operands out.
//!
//! Each product keeps 16 vectors of accumulators in registers and is a function of its own, compiled for the widest
//! vector unit the CPU has: inlined into the tile loop, the register allocator stored the accumulators to the stack
//! at every key, which halved their speed. Every sum runs in the same order as one query at a time would run it
//! (over the head's columns for a score, over the keys for an output), multiplications and additions stay separate
//! (no fused multiply-add), so results do not depend on the layout chosen or on the vector width.
//!
//! Two layouts of the scores exist. With many query rows, the rows lie across the vector lanes (`scores_t[j][r]`,
//! [`key_scores`]): the online softmax then works on whole vectors, the per-row maxima and sums included, and the keys
//! are read as rows, with no transposed copy. With few rows (decoding: one position, a group of heads), keys lie across
//! the lanes (`scores[r][j]`, [`block_scores`]), so that a vector is not mostly padding.

use super::fast_exp::with_simd;
use super::tiled_attention::{BLOCK_KEYS, KeyRows};

/// Query rows (row-major layout) or keys (rows-in-lanes layout) one step of a product covers.
pub(crate) const STRIP: usize = 4;
/// Query rows per vector in the rows-in-lanes layout.
pub(crate) const LANES: usize = 16;
/// Value columns one step of the output product covers.
const COLUMNS: usize = 64;

/// `scores_t[j · padded + r] = Σ_c keys[start + j][c] · queries_t[c · padded + r]` for the `count` keys from `start`
/// and `padded` rows (a multiple of [`LANES`], at most 4 vectors); rows `j ≥ count` of the block are `−∞`.
#[inline(never)]
pub(crate) fn key_scores(
    queries_t: &[f32],
    padded: usize,
    keys: &KeyRows,
    (start, count): (usize, usize),
    scores_t: &mut [f32],
) {
    with_simd(
        #[inline(always)]
        || match padded / LANES {
            1 => key_scores_in_lanes::<1>(queries_t, keys, (start, count), scores_t),
            2 => key_scores_in_lanes::<2>(queries_t, keys, (start, count), scores_t),
            3 => key_scores_in_lanes::<3>(queries_t, keys, (start, count), scores_t),
            4 => key_scores_in_lanes::<4>(queries_t, keys, (start, count), scores_t),
            vectors => unreachable!("{vectors} vectors of query rows in one block"),
        },
    );
    scores_t[count * padded..BLOCK_KEYS * padded].fill(f32::NEG_INFINITY);
}

#[inline(always)]
fn key_scores_in_lanes<const VECTORS: usize>(
    queries_t: &[f32],
    keys: &KeyRows,
    (start, count): (usize, usize),
    scores_t: &mut [f32],
) {
    let (d, padded) = (keys.head_dim, VECTORS * LANES);
    let queries_t = &queries_t[..d * padded];
    for j0 in (0..count).step_by(STRIP) {
        let mut acc = [[[0f32; LANES]; VECTORS]; STRIP];
        // Keys past the block's end repeat its last key; their scores are not stored.
        let key_rows: [&[f32]; STRIP] = std::array::from_fn(|i| &keys.row(start + (j0 + i).min(count - 1))[..d]);
        for (c, column) in queries_t.chunks_exact(padded).enumerate() {
            // Fixed-size vectors, so that the loops vectorise and the accumulators stay in registers.
            let column: [&[f32; LANES]; VECTORS] =
                std::array::from_fn(|v| column[v * LANES..(v + 1) * LANES].try_into().expect("a vector of rows"));
            for (acc_key, key) in acc.iter_mut().zip(&key_rows) {
                let k = key[c];
                for (lanes, queries) in acc_key.iter_mut().zip(&column) {
                    for (lane, &q) in lanes.iter_mut().zip(queries.iter()) {
                        *lane += q * k;
                    }
                }
            }
        }
        for (i, acc_key) in acc.iter().enumerate().take(count - j0) {
            for (vector, lanes) in acc_key.iter().enumerate() {
                scores_t[(j0 + i) * padded + vector * LANES..][..LANES].copy_from_slice(lanes);
            }
        }
    }
}

/// `scores[r · BLOCK_KEYS + j] = Σ_c queries[r · d + c] · keys_transposed[c · BLOCK_KEYS + j]` for `padded` rows (a
/// multiple of [`STRIP`]).
#[inline(never)]
pub(crate) fn block_scores(queries: &[f32], padded: usize, d: usize, keys_transposed: &[f32], scores: &mut [f32]) {
    with_simd(
        #[inline(always)]
        || block_scores_in_lanes(queries, padded, d, keys_transposed, scores),
    )
}

#[inline(always)]
fn block_scores_in_lanes(queries: &[f32], padded: usize, d: usize, keys_transposed: &[f32], scores: &mut [f32]) {
    for r0 in (0..padded).step_by(STRIP) {
        let mut acc = [[0f32; BLOCK_KEYS]; STRIP];
        for c in 0..d {
            let key_column: &[f32; BLOCK_KEYS] =
                keys_transposed[c * BLOCK_KEYS..(c + 1) * BLOCK_KEYS].try_into().expect("a block row");
            for (r, lanes) in acc.iter_mut().enumerate() {
                let x = queries[(r0 + r) * d + c];
                for (lane, &k) in lanes.iter_mut().zip(key_column) {
                    *lane += x * k;
                }
            }
        }
        for (r, lanes) in acc.iter().enumerate() {
            scores[(r0 + r) * BLOCK_KEYS..(r0 + r + 1) * BLOCK_KEYS].copy_from_slice(lanes);
        }
    }
}

/// `output[r] = alphas[r] · output[r] + Σ_j weights_t[j · padded + r] · values[j]` over the block's
/// [`BLOCK_KEYS`] value rows (`head_dim = d` each; rows past the block's keys are zero, as are their weights), for
/// `padded = alphas.len()` rows (a multiple of [`STRIP`]).
#[inline(never)]
pub(crate) fn block_output(weights_t: &[f32], alphas: &[f32], values: &[f32], d: usize, output: &mut [f32]) {
    with_simd(
        #[inline(always)]
        || block_output_in_lanes(weights_t, alphas, values, d, output),
    )
}

#[inline(always)]
fn block_output_in_lanes(weights_t: &[f32], alphas: &[f32], values: &[f32], d: usize, output: &mut [f32]) {
    let padded = alphas.len();
    let (values, weights_t) = (&values[..BLOCK_KEYS * d], &weights_t[..BLOCK_KEYS * padded]);
    for r0 in (0..padded).step_by(STRIP) {
        let mut c0 = 0;
        while c0 + COLUMNS <= d {
            let mut acc: [[f32; COLUMNS]; STRIP] = std::array::from_fn(|r| {
                let (row, alpha): (&[f32; COLUMNS], f32) =
                    (output[(r0 + r) * d + c0..][..COLUMNS].try_into().expect("an output strip"), alphas[r0 + r]);
                std::array::from_fn(|c| row[c] * alpha)
            });
            // Operands checked before the loop, so that no bounds check (and no store of the accumulators) sits in it.
            let strips = values.chunks_exact(d).map(|row| &row[c0..c0 + COLUMNS]);
            let weights = weights_t.chunks_exact(padded).map(|row| &row[r0..r0 + STRIP]);
            for (value, weights) in strips.zip(weights) {
                let value: &[f32; COLUMNS] = value.try_into().expect("a value strip");
                let weights: &[f32; STRIP] = weights.try_into().expect("row weights");
                for (lanes, &p) in acc.iter_mut().zip(weights) {
                    for (lane, &v) in lanes.iter_mut().zip(value) {
                        *lane += p * v;
                    }
                }
            }
            for (r, lanes) in acc.iter().enumerate() {
                output[(r0 + r) * d + c0..][..COLUMNS].copy_from_slice(lanes);
            }
            c0 += COLUMNS;
        }
        if c0 < d {
            // Heads narrower than a strip (or their tail): plain loops.
            for r in r0..r0 + STRIP {
                let alpha = alphas[r];
                let row = &mut output[r * d + c0..(r + 1) * d];
                row.iter_mut().for_each(|o| *o *= alpha);
                for j in 0..BLOCK_KEYS {
                    let p = weights_t[j * padded + r];
                    for (o, &v) in row.iter_mut().zip(&values[j * d + c0..(j + 1) * d]) {
                        *o += p * v;
                    }
                }
            }
        }
    }
}

/// Rows `start..start + count` of `rows`, transposed into `out` (`head_dim × BLOCK_KEYS`), zero beyond `count`.
pub(crate) fn pack_transposed(rows: &KeyRows, start: usize, count: usize, out: &mut [f32]) {
    for j in 0..BLOCK_KEYS {
        match j < count {
            true => {
                for (c, &x) in rows.row(start + j).iter().enumerate() {
                    out[c * BLOCK_KEYS + j] = x;
                }
            }
            false => (0..rows.head_dim).for_each(|c| out[c * BLOCK_KEYS + j] = 0.0),
        }
    }
}

/// Rows `start..start + count` of `rows`, one after the other in `out` (`BLOCK_KEYS × head_dim`), zero beyond `count`.
pub(crate) fn pack_rows(rows: &KeyRows, start: usize, count: usize, out: &mut [f32]) {
    let d = rows.head_dim;
    for j in 0..count {
        out[j * d..(j + 1) * d].copy_from_slice(rows.row(start + j));
    }
    out[count * d..BLOCK_KEYS * d].fill(0.0);
}

/// `out[j · padded + r] = scores[r · BLOCK_KEYS + j]`: row-major block scores (`padded` rows) into the layout
/// [`block_output`] reads.
pub(crate) fn transpose_scores(scores: &[f32], padded: usize, out: &mut [f32]) {
    for (r, row) in scores[..padded * BLOCK_KEYS].chunks_exact(BLOCK_KEYS).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            out[j * padded + r] = x;
        }
    }
}
