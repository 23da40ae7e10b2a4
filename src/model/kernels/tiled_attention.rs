//! Attention in tiles: blocks of queries against blocks of keys, with an online softmax (flash-attention style).
//!
//! The first CPU kernels computed one query at a time: a dot product per key, a softmax over the query's row, a
//! weighted sum of value rows. That costs little for the short sentences of ME-PPL, but the work per query grows with
//! the sequence, and a dot product of 64 numbers ends in a horizontal sum that takes as long as the products: a
//! 5,000-token document ran ten times slower than PyTorch. Here the queries of one key/value head — every query head
//! of its group at a run of positions — form a block of up to [`BLOCK_ROWS`] rows, and the keys the block sees are
//! visited [`BLOCK_KEYS`] at a time:
//!
//! 1. the key block is copied transposed (`head_dim × 64`) and the value block row by row, once for all the rows of
//!    the query block (so one key row serves every query head of its group);
//! 2. the scores `S = Q·Kᵀ` are a small matrix product, 4 query rows × 64 keys of accumulators per step;
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

use super::fast_exp::exp_f32;
use crate::model::layers::AttentionShape;

/// Query rows per block (the query heads of one group × positions).
pub const BLOCK_ROWS: usize = 64;
/// Keys per block.
pub const BLOCK_KEYS: usize = 64;
/// Query rows one step of the score and output products covers.
const STRIP: usize = 4;
/// Value columns one step of the output product covers.
const COLUMNS: usize = 64;

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
    output: Vec<f32>,
    maxima: Vec<f32>,
    sums: Vec<f32>,
}

/// Attention of up to [`BLOCK_ROWS`] query rows over the keys they see.
///
/// `query(r)` gives row `r`'s `head_dim` values, `positions[r]` its position; the row sees the keys at
/// `shape.first_visible(p)..=p` and scores them scaled by `shape.scale`. The output of row `r` goes to
/// `write(r, values)` (normalised) and, when asked, its log-sum-exp of the scaled scores to `log_sums[r]`.
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
    let padded = rows.div_ceil(STRIP) * STRIP;
    let Scratch { queries, keys_transposed, values: value_block, scores, output, maxima, sums } = scratch;
    fill(queries, padded * d);
    for r in 0..rows {
        for (slot, &x) in queries[r * d..(r + 1) * d].iter_mut().zip(query(r)) {
            *slot = x * shape.scale;
        }
    }
    fill(keys_transposed, d * BLOCK_KEYS);
    fill(value_block, BLOCK_KEYS * d);
    fill(scores, padded * BLOCK_KEYS);
    fill(output, padded * d);
    maxima.clear();
    maxima.resize(padded, f32::NEG_INFINITY);
    fill(sums, padded);

    let (first_key, last_key) = seen_keys(positions, shape);
    let (lowest_last, highest_first) = (
        positions.iter().copied().min().unwrap_or(0),
        positions.iter().map(|&p| shape.first_visible(p)).max().unwrap_or(0),
    );
    let mut start = first_key;
    while start <= last_key {
        let count = BLOCK_KEYS.min(last_key + 1 - start);
        pack_transposed(keys, start, count, keys_transposed);
        pack_rows(values, start, count, value_block);
        block_scores(queries, padded, d, keys_transposed, scores);
        // Every row sees every key of the block: no mask needed.
        let whole = count == BLOCK_KEYS && start + count - 1 <= lowest_last && start >= highest_first;
        if !whole {
            for r in 0..padded {
                let position = positions[r.min(rows - 1)];
                let first = shape.first_visible(position);
                for (j, score) in scores[r * BLOCK_KEYS..(r + 1) * BLOCK_KEYS].iter_mut().enumerate() {
                    let key = start + j;
                    if j >= count || key > position || key < first {
                        *score = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mut alphas = [0f32; BLOCK_ROWS];
        for r in 0..padded {
            let row = &mut scores[r * BLOCK_KEYS..(r + 1) * BLOCK_KEYS];
            let block_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = maxima[r].max(block_max);
            if new_max == f32::NEG_INFINITY {
                // The row has seen no key yet: nothing to add.
                row.fill(0.0);
                alphas[r] = 1.0;
                continue;
            }
            let alpha = if maxima[r] == f32::NEG_INFINITY { 0.0 } else { exp_f32(maxima[r] - new_max) };
            let mut total = 0f32;
            for score in row.iter_mut() {
                let p = if *score == f32::NEG_INFINITY { 0.0 } else { exp_f32(*score - new_max) };
                *score = p;
                total += p;
            }
            sums[r] = sums[r] * alpha + total;
            maxima[r] = new_max;
            alphas[r] = alpha;
        }
        block_output(scores, &alphas[..padded], value_block, count, d, output);
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
                let p = if visible { exp_f32(*score - lse) } else { 0.0 };
                // scores now hold p, slopes ∂S.
                *slope = p * (*slope - delta);
                *score = p;
            }
        }
        block_output(slopes, &ones[..padded], key_rows, count, d, query_grads);
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

/// Rows `start..start + count` of `rows`, transposed into `out` (`head_dim × BLOCK_KEYS`), zero beyond `count`.
fn pack_transposed(rows: &KeyRows, start: usize, count: usize, out: &mut [f32]) {
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

/// Rows `start..start + count` of `rows`, one after the other in `out` (`count × head_dim`).
fn pack_rows(rows: &KeyRows, start: usize, count: usize, out: &mut [f32]) {
    let d = rows.head_dim;
    for j in 0..count {
        out[j * d..(j + 1) * d].copy_from_slice(rows.row(start + j));
    }
}

fn fill(buffer: &mut Vec<f32>, len: usize) {
    buffer.clear();
    buffer.resize(len, 0.0);
}

/// `scores[r, j] = Σ_c queries[r, c] · keys_transposed[c, j]` for `padded` rows (a multiple of [`STRIP`]).
#[inline(always)]
fn block_scores(queries: &[f32], padded: usize, d: usize, keys_transposed: &[f32], scores: &mut [f32]) {
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

/// `output[r] = alphas[r] · output[r] + Σ_{j < count} weights[r, j] · values[j]` for every row.
#[inline(always)]
fn block_output(weights: &[f32], alphas: &[f32], values: &[f32], count: usize, d: usize, output: &mut [f32]) {
    for r0 in (0..alphas.len()).step_by(STRIP) {
        let mut c0 = 0;
        while c0 + COLUMNS <= d {
            let mut acc = [[0f32; COLUMNS]; STRIP];
            for (r, lanes) in acc.iter_mut().enumerate() {
                let alpha = alphas[r0 + r];
                for (lane, &o) in lanes.iter_mut().zip(&output[(r0 + r) * d + c0..][..COLUMNS]) {
                    *lane = o * alpha;
                }
            }
            for j in 0..count {
                let value: &[f32; COLUMNS] = values[j * d + c0..][..COLUMNS].try_into().expect("a value strip");
                for (r, lanes) in acc.iter_mut().enumerate() {
                    let p = weights[(r0 + r) * BLOCK_KEYS + j];
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
                for j in 0..count {
                    let p = weights[r * BLOCK_KEYS + j];
                    for (o, &v) in row.iter_mut().zip(&values[j * d + c0..(j + 1) * d]) {
                        *o += p * v;
                    }
                }
            }
        }
    }
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
