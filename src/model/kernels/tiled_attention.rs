//! Attention in tiles: blocks of queries against blocks of keys, with an online softmax (flash-attention style).
//!
//! The first CPU kernels computed one query at a time: a dot product per key, a softmax over the query's row, a
//! weighted sum of value rows. That costs little for the short sentences of ME-PPL, but the work per query grows with
//! the sequence, and a dot product of 64 numbers ends in a horizontal sum that takes as long as the products: a
//! 5,000-token document ran ten times slower than PyTorch. Here the queries of one key/value head — every query head
//! of its group at a run of positions — form a block of up to [`BLOCK_ROWS`] rows, and the keys the block sees are
//! visited [`BLOCK_KEYS`] at a time:
//!
//! 1. the value block is copied row by row, once for all the rows of the query block (so one key row serves every
//!    query head of its group);
//! 2. the scores `S = Q·Kᵀ` are a small matrix product ([`super::tile_products`]): with many query rows the rows lie
//!    across the vector lanes and four keys are read straight from their rows per step, with few (decoding) the
//!    keys lie across the lanes, copied transposed;
//! 3. keys outside a row's view (later positions, or before a sliding window) get `−∞`; key blocks no row sees are
//!    never visited, so a window skips work instead of masking it;
//! 4. the online softmax keeps each row's running maximum `m` and sum `l`: with `m' = max(m, max_j S_j)`, the row's
//!    partial output and sum are scaled by `e^{m − m'}` and the block's `e^{S_j − m'}` added, `O += P·V` being the
//!    second small product, 4 rows × 64 value columns of accumulators;
//! 5. the output is `O / l`, and `m + ln l` (the row's log-sum-exp) is kept for a backward pass.
//!
//! Block boundaries depend on positions only, never on threads, so every output is computed by the same operations
//! in the same order on every run. Callers (the fast path's packed attention, the prefix path, decoding) describe the
//! keys a block sees with [`KeyRows`], a sequence's rows in up to two parts (a cached prefix and its own rows).

use super::fast_exp::{exp_f32, max_of, with_simd};
use super::tile_products::{
    LANES, STRIP, block_output, block_scores, key_scores, pack_rows, pack_transposed, transpose_scores,
};
use crate::model::layers::AttentionShape;

/// Query rows per block (the query heads of one group × positions).
pub const BLOCK_ROWS: usize = 64;
/// Keys per block.
pub const BLOCK_KEYS: usize = 64;

/// The key (or value) rows of one sequence and key/value head, by position: positions `0..first_part_rows` in the
/// first part, the rest in the second; row `j` of a part starts at `j · width + column`.
#[derive(Clone, Copy)]
pub struct KeyRows<'a> {
    /// Up to two parts of consecutive positions: `(values, rows)`.
    pub parts: [(&'a [f32], usize); 2],
    /// Floats per row of a part (all key/value heads).
    pub width: usize,
    /// Where this head's `head_dim` columns start in a row.
    pub column: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl<'a> KeyRows<'a> {
    /// One part only.
    pub fn single(values: &'a [f32], rows: usize, width: usize, column: usize, head_dim: usize) -> Self {
        KeyRows { parts: [(values, rows), (&[], 0)], width, column, head_dim }
    }

    /// The head's row at `position`.
    #[inline(always)]
    pub fn row(&self, position: usize) -> &'a [f32] {
        let (values, position) = match position < self.parts[0].1 {
            true => (self.parts[0].0, position),
            false => (self.parts[1].0, position - self.parts[0].1),
        };
        &values[position * self.width + self.column..][..self.head_dim]
    }
}

/// Reusable buffers of one thread.
#[derive(Default)]
pub struct Scratch {
    queries: Vec<f32>,
    keys_transposed: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
    weights_t: Vec<f32>,
    output: Vec<f32>,
    maxima: Vec<f32>,
    sums: Vec<f32>,
    alphas: Vec<f32>,
}

/// Attention of up to [`BLOCK_ROWS`] query rows over the keys they see.
///
/// `query(r)` gives row `r`'s `head_dim` values, `positions[r]` its position; the row sees the keys at
/// `shape.first_visible(p)..=p` and scores them scaled by `shape.scale`. The output of row `r` goes to
/// `write(r, values)` (normalised) and, when asked, its log-sum-exp of the scaled scores to `log_sums[r]`.
/// Blocks of at least [`LANES`] rows lay their rows across the vector lanes, smaller ones (decoding) their keys (see
/// [`super::tile_products`]); both compute the same sums in the same order.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn attend_block<'q>(
    query: impl Fn(usize) -> &'q [f32],
    positions: &[usize],
    keys: &KeyRows,
    values: &KeyRows,
    shape: AttentionShape,
    scratch: &mut Scratch,
    mut write: impl FnMut(usize, &[f32]),
    log_sums: Option<&mut [f32]>,
) {
    let rows = positions.len();
    debug_assert!(rows > 0 && rows <= BLOCK_ROWS);
    let d = keys.head_dim;
    let rows_in_lanes = rows >= LANES;
    let step = if rows_in_lanes { LANES } else { STRIP };
    let padded = rows.div_ceil(step) * step;
    let Scratch { queries, keys_transposed, values: value_block, scores, weights_t, output, maxima, sums, alphas } =
        scratch;
    // Scaled queries: `d × padded` with the rows across the lanes, else `padded × d`; padding rows are zero.
    fill(queries, padded * d);
    for r in 0..rows {
        for (c, &x) in query(r).iter().enumerate() {
            queries[if rows_in_lanes { c * padded + r } else { r * d + c }] = x * shape.scale;
        }
    }
    fill(keys_transposed, d * BLOCK_KEYS);
    fill(value_block, BLOCK_KEYS * d);
    fill(scores, padded * BLOCK_KEYS);
    fill(weights_t, BLOCK_KEYS * padded);
    fill(output, padded * d);
    maxima.clear();
    maxima.resize(padded, f32::NEG_INFINITY);
    fill(sums, padded);
    fill(alphas, padded);

    // Padding rows see what the last row sees (their outputs are dropped).
    let position_of = |r: usize| positions[r.min(rows - 1)];
    let (first_key, last_key) = seen_keys(positions, shape);
    let (lowest_last, highest_first) = (
        positions.iter().copied().min().unwrap_or(0),
        positions.iter().map(|&p| shape.first_visible(p)).max().unwrap_or(0),
    );
    let mut start = first_key;
    while start <= last_key {
        let count = BLOCK_KEYS.min(last_key + 1 - start);
        pack_rows(values, start, count, value_block);
        // Every row sees every key of the block: no mask needed.
        let whole = count == BLOCK_KEYS && start + count - 1 <= lowest_last && start >= highest_first;
        let hidden = |r: usize, key: usize| {
            let position = position_of(r);
            key > position || key < shape.first_visible(position)
        };
        if rows_in_lanes {
            key_scores(queries, padded, keys, (start, count), weights_t);
            if !whole {
                for (j, row) in weights_t[..count * padded].chunks_exact_mut(padded).enumerate() {
                    for (r, score) in row.iter_mut().enumerate() {
                        if hidden(r, start + j) {
                            *score = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            softmax_in_lanes(weights_t, maxima, sums, alphas);
        } else {
            pack_transposed(keys, start, count, keys_transposed);
            block_scores(queries, padded, d, keys_transposed, scores);
            if !whole {
                for (r, row) in scores.chunks_exact_mut(BLOCK_KEYS).enumerate() {
                    for (j, score) in row.iter_mut().enumerate() {
                        if j >= count || hidden(r, start + j) {
                            *score = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            softmax_by_rows(scores, maxima, sums, alphas);
            transpose_scores(scores, padded, weights_t);
        }
        block_output(weights_t, alphas, value_block, d, output);
        start += count;
    }
    for r in 0..rows {
        let inverse = 1.0 / sums[r];
        let row = &mut output[r * d..(r + 1) * d];
        row.iter_mut().for_each(|x| *x *= inverse);
        write(r, row);
    }
    if let Some(log_sums) = log_sums {
        for r in 0..rows {
            log_sums[r] = maxima[r] + sums[r].ln();
        }
    }
}

/// One key block's step of the online softmax for each row: with the row's running maximum `m` and the block's
/// maximum, `m' = max(m, block max)`; the block's scores become `e^{S − m'}` (0 for hidden keys), the running sum
/// `l ← l · e^{m − m'} + Σ e^{S − m'}` (keys in order), and `alphas` gets `e^{m − m'}` for the output product (1
/// while a row has seen no key, 0 at its first one).
#[inline(always)]
fn online_softmax_step(maximum: &mut f32, block_max: f32) -> (f32, f32) {
    let new_max = maximum.max(block_max);
    let alpha = match (new_max == f32::NEG_INFINITY, *maximum == f32::NEG_INFINITY) {
        (true, _) => 1.0,
        (false, true) => 0.0,
        (false, false) => exp_f32(*maximum - new_max),
    };
    *maximum = new_max;
    (new_max, alpha)
}

/// [`online_softmax_step`] for scores laid out `BLOCK_KEYS × padded` (rows across the lanes), 16 rows at a time.
#[inline(never)]
fn softmax_in_lanes(scores_t: &mut [f32], maxima: &mut [f32], sums: &mut [f32], alphas: &mut [f32]) {
    let padded = maxima.len();
    with_simd(
        #[inline(always)]
        || {
            for v in (0..padded).step_by(LANES) {
                let mut block_max = [f32::NEG_INFINITY; LANES];
                for row in scores_t[..BLOCK_KEYS * padded].chunks_exact(padded) {
                    for (m, &x) in block_max.iter_mut().zip(&row[v..v + LANES]) {
                        *m = m.max(x);
                    }
                }
                let mut new_max = [0f32; LANES];
                for l in 0..LANES {
                    (new_max[l], alphas[v + l]) = online_softmax_step(&mut maxima[v + l], block_max[l]);
                }
                let mut totals = [0f32; LANES];
                for row in scores_t[..BLOCK_KEYS * padded].chunks_exact_mut(padded) {
                    for ((score, total), &m) in row[v..v + LANES].iter_mut().zip(&mut totals).zip(&new_max) {
                        // A select, not a branch, so that the exponentials vectorise.
                        let p = exp_f32(*score - m);
                        *score = if *score == f32::NEG_INFINITY { 0.0 } else { p };
                        *total += *score;
                    }
                }
                for l in 0..LANES {
                    sums[v + l] = sums[v + l] * alphas[v + l] + totals[l];
                }
            }
        },
    )
}

/// [`online_softmax_step`] for scores laid out row by row (`padded × BLOCK_KEYS`).
#[inline(never)]
fn softmax_by_rows(scores: &mut [f32], maxima: &mut [f32], sums: &mut [f32], alphas: &mut [f32]) {
    with_simd(
        #[inline(always)]
        || {
            for (r, row) in scores.chunks_exact_mut(BLOCK_KEYS).enumerate().take(maxima.len()) {
                let (new_max, alpha) = online_softmax_step(&mut maxima[r], max_of(row));
                for score in row.iter_mut() {
                    let p = exp_f32(*score - new_max);
                    *score = if *score == f32::NEG_INFINITY { 0.0 } else { p };
                }
                let total = row.iter().fold(0f32, |total, &p| total + p);
                sums[r] = sums[r] * alpha + total;
                alphas[r] = alpha;
            }
        },
    )
}

/// Reusable buffers of one thread for [`attend_block_backward`].
#[derive(Default)]
pub struct BackwardScratch {
    queries: Vec<f32>,
    out_grads: Vec<f32>,
    deltas: Vec<f32>,
    keys_transposed: Vec<f32>,
    values_transposed: Vec<f32>,
    key_rows: Vec<f32>,
    scores: Vec<f32>,
    slopes: Vec<f32>,
    slopes_t: Vec<f32>,
    query_grads: Vec<f32>,
}

/// The gradients of one block of [`attend_block`] given the output gradient, recomputing the attention weights from
/// the forward's log-sum-exps (`p_j = e^{S_j − lse}`) block by block:
///
/// `∂S_j = p_j (∂o·v_j − ∂o·o)`, then `∂q += c Σ_j ∂S_j k_j`, and for the keys at positions from `trainable_from`
/// on, `∂k_j += c Σ_r ∂S_rj q_r` and `∂v_j += Σ_r p_rj ∂o_r` (`c` the score scale). Row `r`'s query gradient goes
/// to `write_query_grad(r, values)`; key and value gradients are added to `key_grads` and `value_grads`, whose row
/// `i` belongs to position `trainable_from + i` (`head_dim` values each).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn attend_block_backward<'q>(
    (query, out_grad, output): (impl Fn(usize) -> &'q [f32], impl Fn(usize) -> &'q [f32], impl Fn(usize) -> &'q [f32]),
    log_sums: &[f32],
    positions: &[usize],
    (keys, values): (&KeyRows, &KeyRows),
    shape: AttentionShape,
    scratch: &mut BackwardScratch,
    mut write_query_grad: impl FnMut(usize, &[f32]),
    (trainable_from, key_grads, value_grads): (usize, &mut [f32], &mut [f32]),
) {
    let rows = positions.len();
    let (d, scale) = (keys.head_dim, shape.scale);
    let padded = rows.div_ceil(STRIP) * STRIP;
    let BackwardScratch {
        queries,
        out_grads,
        deltas,
        keys_transposed,
        values_transposed,
        key_rows,
        scores,
        slopes,
        slopes_t,
        query_grads,
    } = scratch;
    fill(queries, padded * d);
    fill(out_grads, padded * d);
    fill(deltas, padded);
    for r in 0..rows {
        for (slot, &x) in queries[r * d..(r + 1) * d].iter_mut().zip(query(r)) {
            *slot = x * scale;
        }
        out_grads[r * d..(r + 1) * d].copy_from_slice(out_grad(r));
        deltas[r] = out_grad(r).iter().zip(output(r)).map(|(a, b)| a * b).sum();
    }
    fill(keys_transposed, d * BLOCK_KEYS);
    fill(values_transposed, d * BLOCK_KEYS);
    fill(key_rows, BLOCK_KEYS * d);
    fill(scores, padded * BLOCK_KEYS);
    fill(slopes, padded * BLOCK_KEYS);
    fill(slopes_t, BLOCK_KEYS * padded);
    fill(query_grads, padded * d);
    let ones = [1f32; BLOCK_ROWS];

    let (first_key, last_key) = seen_keys(positions, shape);
    let mut start = first_key;
    while start <= last_key {
        let count = BLOCK_KEYS.min(last_key + 1 - start);
        pack_transposed(keys, start, count, keys_transposed);
        pack_transposed(values, start, count, values_transposed);
        pack_rows(keys, start, count, key_rows);
        block_scores(queries, padded, d, keys_transposed, scores);
        block_scores(out_grads, padded, d, values_transposed, slopes);
        for r in 0..padded {
            let (position, lse, delta) = match r < rows {
                true => (positions[r], log_sums[r], deltas[r]),
                false => (0, 0.0, 0.0),
            };
            let first = shape.first_visible(position);
            let row = r * BLOCK_KEYS..(r + 1) * BLOCK_KEYS;
            for ((j, score), slope) in scores[row.clone()].iter_mut().enumerate().zip(&mut slopes[row]) {
                let key = start + j;
                let visible = r < rows && j < count && key <= position && key >= first;
                // Computed for every key and then selected, so that the loop vectorises.
                let p = exp_f32(*score - lse);
                let p = if visible { p } else { 0.0 };
                // scores now hold p, slopes ∂S.
                *slope = p * (*slope - delta);
                *score = p;
            }
        }
        transpose_scores(slopes, padded, slopes_t);
        block_output(slopes_t, &ones[..padded], key_rows, d, query_grads);
        for j in 0..count {
            let Some(local) = (start + j).checked_sub(trainable_from) else { continue };
            let (key_grad, value_grad) =
                (&mut key_grads[local * d..(local + 1) * d], &mut value_grads[local * d..(local + 1) * d]);
            for r in 0..rows {
                let (score_grad, p) = (slopes[r * BLOCK_KEYS + j], scores[r * BLOCK_KEYS + j]);
                if p == 0.0 {
                    continue;
                }
                // `queries` hold c·q already.
                for (g, &x) in key_grad.iter_mut().zip(&queries[r * d..(r + 1) * d]) {
                    *g += score_grad * x;
                }
                for (g, &x) in value_grad.iter_mut().zip(&out_grads[r * d..(r + 1) * d]) {
                    *g += p * x;
                }
            }
        }
        start += count;
    }
    for r in 0..rows {
        let row = &mut query_grads[r * d..(r + 1) * d];
        row.iter_mut().for_each(|g| *g *= scale);
        write_query_grad(r, row);
    }
}

/// The first and last key positions any row of a block sees.
fn seen_keys(positions: &[usize], shape: AttentionShape) -> (usize, usize) {
    let first = positions.iter().map(|&p| shape.first_visible(p)).min().unwrap_or(0);
    (first, positions.iter().copied().max().unwrap_or(0))
}

fn fill(buffer: &mut Vec<f32>, len: usize) {
    buffer.clear();
    buffer.resize(len, 0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One query at a time, as the first kernels did: the reference for the tiles.
    fn naive(query: &[f32], position: usize, keys: &KeyRows, values: &KeyRows, shape: AttentionShape) -> Vec<f32> {
        let scale = shape.scale;
        let seen: Vec<usize> = (shape.first_visible(position)..=position).collect();
        let scores: Vec<f64> = seen
            .iter()
            .map(|&j| query.iter().zip(keys.row(j)).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>())
            .map(|s| s * f64::from(scale))
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..keys.head_dim)
            .map(|c| {
                (seen.iter().zip(&weights).map(|(&j, w)| w * f64::from(values.row(j)[c])).sum::<f64>() / total) as f32
            })
            .collect()
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn both_score_layouts_give_the_same_bits() {
        // A block of 48 rows lays its rows across the lanes; the same rows one at a time lay the keys across them.
        // Both must run the same sums in the same order, so the outputs agree bit for bit. (Without a window: with
        // one, a block's first key block starts where its earliest row's window does, so a row alone is tiled
        // differently and its online softmax rescales at other places.)
        for (head_dim, length) in [(64, 200), (80, 130), (256, 100)] {
            let width = head_dim;
            let keys_values: &'static [f32] = Box::leak(pseudo_random(length * width, 4).into_boxed_slice());
            let value_values: &'static [f32] = Box::leak(pseudo_random(length * width, 5).into_boxed_slice());
            let (keys, values) = (
                KeyRows::single(keys_values, length, width, 0, head_dim),
                KeyRows::single(value_values, length, width, 0, head_dim),
            );
            let queries = pseudo_random(length * head_dim, 6);
            let shape = AttentionShape::new(1, 1, head_dim).with_scale(0.125);
            let positions: Vec<usize> = (length - 48..length).collect();
            let mut scratch = Scratch::default();
            let run = |positions: &[usize], scratch: &mut Scratch| {
                let (mut rows, mut log_sums) = (vec![vec![]; positions.len()], vec![0f32; positions.len()]);
                attend_block(
                    |r| &queries[positions[r] * head_dim..][..head_dim],
                    positions,
                    &keys,
                    &values,
                    shape,
                    scratch,
                    |r, row| rows[r] = row.to_vec(),
                    Some(&mut log_sums),
                );
                (rows, log_sums)
            };
            let (together, together_sums) = run(&positions, &mut scratch);
            for (r, &p) in positions.iter().enumerate() {
                let (alone, alone_sums) = run(&[p], &mut scratch);
                let bits = |row: &[f32]| row.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&together[r]), bits(&alone[0]), "d {head_dim} position {p}");
                assert_eq!(together_sums[r].to_bits(), alone_sums[0].to_bits(), "d {head_dim} position {p}");
            }
        }
    }

    #[test]
    fn tiles_match_one_query_at_a_time_across_blocks_windows_parts_and_widths() {
        for (head_dim, length, window, split) in [
            (8, 5, None, 0),
            (64, 150, None, 0),
            (64, 150, Some(37), 0),
            (80, 130, None, 70),
            (256, 200, Some(64), 129),
            (64, 64, Some(1), 10),
        ] {
            let (kv_heads, head) = (2, 1);
            let width = kv_heads * head_dim;
            let (key_values, value_values) = (pseudo_random(length * width, 1), pseudo_random(length * width, 2));
            let part = |values: &'static [f32]| KeyRows {
                parts: [(&values[..split * width], split), (&values[split * width..], length - split)],
                width,
                column: head * head_dim,
                head_dim,
            };
            let (key_values, value_values): (&'static [f32], &'static [f32]) =
                (Box::leak(key_values.into_boxed_slice()), Box::leak(value_values.into_boxed_slice()));
            let (keys, values) = (part(key_values), part(value_values));
            let queries = pseudo_random(length * head_dim, 3);
            let shape = AttentionShape::new(2, kv_heads, head_dim).with_window(window).with_scale(0.125);
            let mut scratch = Scratch::default();
            // Blocks of 3 heads × 13 positions, the last one ragged, plus a block of one row.
            let mut blocks: Vec<Vec<usize>> =
                (0..length).step_by(13).map(|p| (p..(p + 13).min(length)).flat_map(|p| [p, p, p]).collect()).collect();
            blocks.push(vec![length - 1]);
            for positions in blocks {
                let mut got = vec![vec![]; positions.len()];
                let mut log_sums = vec![0f32; positions.len()];
                attend_block(
                    |r| &queries[positions[r] * head_dim..][..head_dim],
                    &positions,
                    &keys,
                    &values,
                    shape,
                    &mut scratch,
                    |r, row| got[r] = row.to_vec(),
                    Some(&mut log_sums),
                );
                for (r, &p) in positions.iter().enumerate() {
                    let expected = naive(&queries[p * head_dim..][..head_dim], p, &keys, &values, shape);
                    let error = got[r].iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(error < 1e-5, "d {head_dim} length {length} window {window:?} position {p}: {error}");
                    assert!(log_sums[r].is_finite());
                }
            }
        }
    }
}
