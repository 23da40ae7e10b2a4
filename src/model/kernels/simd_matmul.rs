//! AVX-512 kernels for products of a few dozen rows with a weight matrix, reading the weight where it lies.
//!
//! The `gemm` crate repacks its operands on every call. Editing methods multiply a few dozen rows with each weight,
//! so that repacking (a full read and write of the weight) cost half as much as the arithmetic: measured on one core
//! of this project's Sapphire Rapids VM, a 45-row product with a `1536 × 576` slice of a weight ran at 27–29 GFLOP/s
//! through `gemm` and at 43 GFLOP/s here (`x · Wᵀ`), 22–24 against 47 for `g · W`. Two kernels cover the two
//! orientations of a row-major weight without copying it:
//!
//! - [`dot_columns`] computes `x · Wᵀ` as dot products: a tile of 4 rows × 4 weight rows keeps 16 accumulators over
//!   the shared dimension, then one shuffle tree sums all 16 at once. The 4 weight rows stay in the L1 cache while
//!   the tile walks down the rows of `x`.
//! - [`outer_columns`] computes `g · W` as outer products: 6 rows × 64 output columns of accumulators, one broadcast
//!   of `g` against 4 vectors of a weight row per step, over blocks of 128 weight rows.
//!
//! Each output element is always computed by the same sequence of operations (whatever the tile it falls in, the
//! thread, or the column range asked for), so results are deterministic. The caller checks [`available`] and splits
//! the output columns over threads; shapes need no alignment (tails use masked loads).

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether this CPU runs the kernels (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of `x` a dot-product tile covers.
const DOT_ROWS: usize = 4;
/// Weight rows (output columns) a dot-product tile covers.
const DOT_COLUMNS: usize = 4;
/// Rows of `g` an outer-product tile covers.
const OUTER_ROWS: usize = 6;
/// Output columns an outer-product tile covers (four 16-lane vectors).
pub const OUTER_COLUMNS: usize = 64;
/// Weight rows per block of the outer-product kernel (the block's 64 columns then fill 32 KiB of L1).
const OUTER_DEPTH: usize = 128;
/// Rows of `x` the dot-product kernel takes per pass over a column range, so that they stay in L2.
const DOT_ROW_BLOCK: usize = 128;

/// `y[r, c] = Σ_i x[r, i] · w[c, i]` for every row `r < m` and every column `c` in `columns`.
///
/// `x` is `(m, k)` and `w` is `(n, k)`, both row-major; `y` points to a row-major `(m, n)` output.
///
/// # Safety
/// [`available`] must be true; `x` must hold `m · k` and `w` at least `columns.end · k` elements; `y` must be valid
/// for writes of `m · n` elements, `columns.end <= n`, and no other thread may write these columns of `y`.
pub unsafe fn dot_columns(x: &[f32], m: usize, k: usize, w: &[f32], y: *mut f32, n: usize, columns: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        dot_columns_avx512(x, m, k, w, y, n, columns)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, m, k, w, y, n, columns);
        unreachable!("simd_matmul::available() is false on this architecture")
    }
}

/// `y[r, c] = Σ_j g[r, j] · w[j, c]` for every row `r < m` and every column `c` in `columns`.
///
/// `g` is `(m, depth)` and `w` is `(depth, n)`, both row-major; `y` points to a row-major `(m, n)` output whose
/// columns in `columns` must be zero on entry (the kernel adds into them).
///
/// # Safety
/// [`available`] must be true; `g` must hold `m · depth` and `w` `depth · n` elements; `y` must be valid for reads and
/// writes of `m · n` elements, `columns.end <= n`, and no other thread may touch these columns of `y`.
pub unsafe fn outer_columns(
    g: &[f32],
    m: usize,
    depth: usize,
    w: &[f32],
    y: *mut f32,
    n: usize,
    columns: Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        outer_columns_avx512(g, m, depth, w, y, n, columns)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (g, m, depth, w, y, n, columns);
        unreachable!("simd_matmul::available() is false on this architecture")
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_columns_avx512(x: &[f32], m: usize, k: usize, w: &[f32], y: *mut f32, n: usize, columns: Range<usize>) {
    let tail = tail_mask(k);
    let (x, w) = (x.as_ptr(), w.as_ptr());
    let mut sums = [0f32; 16];
    for block in (0..m).step_by(DOT_ROW_BLOCK) {
        let block_end = (block + DOT_ROW_BLOCK).min(m);
        let full_end = block + (block_end - block) / DOT_ROWS * DOT_ROWS;
        for first_column in columns.clone().step_by(DOT_COLUMNS) {
            let count = DOT_COLUMNS.min(columns.end - first_column);
            // Missing columns repeat the last one; their sums are not stored.
            let w_rows: [*const f32; DOT_COLUMNS] =
                std::array::from_fn(|c| unsafe { w.add((first_column + c.min(count - 1)) * k) });
            for row in (block..full_end).step_by(DOT_ROWS) {
                let x_rows: [*const f32; DOT_ROWS] = std::array::from_fn(|r| unsafe { x.add((row + r) * k) });
                unsafe { dot_tile::<DOT_ROWS, DOT_COLUMNS>(x_rows, w_rows, k, tail, &mut sums) };
                for r in 0..DOT_ROWS {
                    for c in 0..count {
                        unsafe { *y.add((row + r) * n + first_column + c) = sums[r * DOT_COLUMNS + c] };
                    }
                }
            }
        }
        // Leftover rows, one at a time against 16 weight rows.
        for row in full_end..block_end {
            let x_row = [unsafe { x.add(row * k) }];
            for first_column in columns.clone().step_by(16) {
                let count = 16.min(columns.end - first_column);
                let w_rows: [*const f32; 16] =
                    std::array::from_fn(|c| unsafe { w.add((first_column + c.min(count - 1)) * k) });
                unsafe { dot_tile::<1, 16>(x_row, w_rows, k, tail, &mut sums) };
                for (c, sum) in sums.iter().take(count).enumerate() {
                    unsafe { *y.add(row * n + first_column + c) = *sum };
                }
            }
        }
    }
}

/// The mask of the valid lanes in the last 16-lane step over `k` elements (all lanes when `k` is a multiple of 16).
#[cfg(target_arch = "x86_64")]
fn tail_mask(k: usize) -> __mmask16 {
    match k % 16 {
        0 => 0xffff,
        rest => ((1u32 << rest) - 1) as __mmask16,
    }
}

/// Sixteen dot products (`R · C = 16`): `sums[r·C + c] = x_rows[r] · w_rows[c]` over `k` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_tile<const R: usize, const C: usize>(
    x_rows: [*const f32; R],
    w_rows: [*const f32; C],
    k: usize,
    tail: __mmask16,
    sums: &mut [f32; 16],
) {
    let mut acc = [_mm512_setzero_ps(); 16];
    let steps = k.div_ceil(16);
    for step in 0..steps {
        let offset = step * 16;
        let mask = if step + 1 == steps { tail } else { 0xffff };
        let xs: [__m512; R] = std::array::from_fn(|r| unsafe { _mm512_maskz_loadu_ps(mask, x_rows[r].add(offset)) });
        for c in 0..C {
            let wv = unsafe { _mm512_maskz_loadu_ps(mask, w_rows[c].add(offset)) };
            for r in 0..R {
                acc[r * C + c] = _mm512_fmadd_ps(xs[r], wv, acc[r * C + c]);
            }
        }
    }
    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), sum_lanes_of_each(&acc)) };
}

/// Lane `i` of the result is the sum of the 16 lanes of `a[i]` (a shuffle tree: 45 operations for 16 sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_lanes_of_each(a: &[__m512; 16]) -> __m512 {
    // Pairs: within each 128-bit lane, lanes 0+2 and 1+3 of two accumulators.
    let pairs: [__m512; 8] = std::array::from_fn(|i| {
        let (p, q) = (a[2 * i], a[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(p, q), _mm512_unpackhi_ps(p, q))
    });
    // Quads: each 128-bit lane holds that lane's sums of four accumulators.
    let quads: [__m512; 4] = std::array::from_fn(|i| {
        let (p, q) = (_mm512_castps_pd(pairs[2 * i]), _mm512_castps_pd(pairs[2 * i + 1]));
        _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)))
    });
    // Add 128-bit lanes 0+1 and 2+3, then the two halves.
    let halves = |p: __m512, q: __m512| {
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(p, q), _mm512_shuffle_f32x4::<0b11_01_11_01>(p, q))
    };
    let (low, high) = (halves(quads[0], quads[1]), halves(quads[2], quads[3]));
    halves(low, high)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn outer_columns_avx512(
    g: &[f32],
    m: usize,
    depth: usize,
    w: &[f32],
    y: *mut f32,
    n: usize,
    columns: Range<usize>,
) {
    let (g, w) = (g.as_ptr(), w.as_ptr());
    for first_column in columns.clone().step_by(OUTER_COLUMNS) {
        let count = OUTER_COLUMNS.min(columns.end - first_column);
        let masks: [__mmask16; 4] = std::array::from_fn(|v| {
            let lanes = count.saturating_sub(16 * v).min(16);
            if lanes == 16 { 0xffff } else { ((1u32 << lanes) - 1) as __mmask16 }
        });
        for first_depth in (0..depth).step_by(OUTER_DEPTH) {
            let block = OUTER_DEPTH.min(depth - first_depth);
            let w_block = unsafe { w.add(first_depth * n + first_column) };
            let full_end = m / OUTER_ROWS * OUTER_ROWS;
            for row in (0..full_end).step_by(OUTER_ROWS) {
                let g_block = unsafe { g.add(row * depth + first_depth) };
                let y_block = unsafe { y.add(row * n + first_column) };
                unsafe { outer_tile::<OUTER_ROWS>(g_block, depth, w_block, n, block, y_block, n, masks) };
            }
            for row in full_end..m {
                let g_block = unsafe { g.add(row * depth + first_depth) };
                let y_block = unsafe { y.add(row * n + first_column) };
                unsafe { outer_tile::<1>(g_block, depth, w_block, n, block, y_block, n, masks) };
            }
        }
    }
}

/// `y[r, 0..64] += Σ_{j < block} g[r, j] · w[j, 0..64]` for `R` rows, lanes limited by `masks`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn outer_tile<const R: usize>(
    g: *const f32,
    g_stride: usize,
    w: *const f32,
    w_stride: usize,
    block: usize,
    y: *mut f32,
    y_stride: usize,
    masks: [__mmask16; 4],
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for j in 0..block {
        let row = unsafe { w.add(j * w_stride) };
        let ws: [__m512; 4] = std::array::from_fn(|v| unsafe { _mm512_maskz_loadu_ps(masks[v], row.add(16 * v)) });
        for (r, acc) in acc.iter_mut().enumerate() {
            let scale = _mm512_set1_ps(unsafe { *g.add(r * g_stride + j) });
            for v in 0..4 {
                acc[v] = _mm512_fmadd_ps(scale, ws[v], acc[v]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for v in 0..4 {
            let out = unsafe { y.add(r * y_stride + 16 * v) };
            let sum = _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(masks[v], out) }, acc[v]);
            unsafe { _mm512_mask_storeu_ps(out, masks[v], sum) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count).map(|i| ((i * 7919 + seed * 104_729) % 23) as f32 * 0.05 - 0.5).collect()
    }

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, transposed: bool) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                y[r * n + c] = (0..k)
                    .map(|i| x[r * k + i] as f64 * if transposed { w[c * k + i] } else { w[i * n + c] } as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn both_kernels_match_a_plain_product_on_awkward_shapes() {
        if !available() {
            return;
        }
        for (m, k, n) in [(1, 5, 3), (4, 16, 4), (7, 33, 70), (13, 130, 129), (45, 64, 96)] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            for (transposed, name) in [(true, "x·Wᵀ"), (false, "g·W")] {
                let expected = reference(&x, &w, m, k, n, transposed);
                let mut y = vec![0f32; m * n];
                // Two column ranges, as two threads would ask for them.
                let split = n / 3;
                for columns in [0..split, split..n] {
                    unsafe {
                        if transposed {
                            dot_columns(&x, m, k, &w, y.as_mut_ptr(), n, columns)
                        } else {
                            outer_columns(&x, m, k, &w, y.as_mut_ptr(), n, columns)
                        }
                    }
                }
                for (got, want) in y.iter().zip(&expected) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{name} {m}×{k}×{n}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
