//! Products with a weight matrix on the CPU, split by output columns over candle's spinning worker pool.
//!
//! candle hands every matrix product to the `gemm` crate with rayon parallelism. On the small, many-times-repeated
//! products of editing (a few dozen rows against a layer's weight) rayon's hand-offs cost more than they save: measured
//! on two cores, a 45-row product with a `576 × 3072` weight ran at 25 GFLOP/s that way and at 46 GFLOP/s split over
//! candle's [`barrier_pool`](candle_core::utils::barrier_pool) (whose workers spin between calls instead of sleeping).
//! Up to [`SIMD_MAX_ROWS`] rows of `f32` on a CPU with AVX-512, the product runs on the kernels of
//! [`super::simd_matmul`], which read the weight in place instead of repacking it for every call; the threads take
//! ranges of output columns from a shared cursor, so a thread the host has descheduled does not hold the others up.
//! Otherwise (more rows, `f64`, no AVX-512) each thread runs one single-threaded `gemm` on its own slice of columns.
//! Every output element is computed by the same sequence of operations whatever the thread timing, so results are
//! deterministic. Only untracked `f32`/`f64` CPU tensors take this route; for anything else (a weight under
//! optimisation, other devices or dtypes) the functions answer `None` and the caller uses candle's own product.

use candle_core::utils::barrier_pool;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor, WithDType};
use gemm::{Parallelism, gemm};

use super::simd_matmul;

/// Products with at most this many rows use the AVX-512 kernels; larger ones (perplexity batches of thousands of
/// rows) are left to `gemm`, whose cache blocking suits them better.
pub const SIMD_MAX_ROWS: usize = 512;

/// Which orientation the weight enters the product in.
#[derive(Clone, Copy)]
enum WeightUse {
    /// `x · Wᵀ` with `W: (n, k)`.
    Transposed,
    /// `x · W` with `W: (k, n)`.
    AsIs,
}

/// `x · Wᵀ` for `x: (m, k)` and `w: (n, k)` on the worker pool, or `None` when the operands do not qualify.
pub fn try_matmul_weight_transposed(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    split_product(x, w, WeightUse::Transposed)
}

/// `x · W` for `x: (m, k)` and `w: (k, n)` (the input gradient of `x · Wᵀ`) on the worker pool, or `None` when the
/// operands do not qualify.
pub fn try_matmul_weight(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    split_product(x, w, WeightUse::AsIs)
}

/// The product on the worker pool, or `None` when the operands do not qualify.
fn split_product(x: &Tensor, w: &Tensor, weight_use: WeightUse) -> Result<Option<Tensor>> {
    let qualifies = super::generic::use_cpu_kernels(x.device())
        && x.rank() == 2
        && w.rank() == 2
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && !x.track_op()
        && !w.track_op();
    if !qualifies {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (n, w_inner) = match weight_use {
        WeightUse::Transposed => w.dims2()?,
        WeightUse::AsIs => {
            let (rows, cols) = w.dims2()?;
            (cols, rows)
        }
    };
    if w_inner != k || m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = w.storage_and_layout();
    let (Storage::Cpu(x_cpu), Storage::Cpu(w_cpu)) = (&*x_storage, &*w_storage) else {
        return Ok(None);
    };
    // `W` read as the `(k, n)` right operand: element (i, j) at `i·row_stride + j·column_stride`.
    let (row_stride, column_stride) = match weight_use {
        WeightUse::Transposed => (1, k),
        WeightUse::AsIs => (n, 1),
    };
    let shape = Operands { m, n, k, row_stride, column_stride };
    let product = match (x_cpu, w_cpu) {
        (CpuStorage::F32(xs), CpuStorage::F32(ws)) => {
            let (xs, ws) = (slice(xs, x_layout)?, slice(ws, w_layout)?);
            let values = if m <= SIMD_MAX_ROWS && simd_matmul::available() {
                shape.run_simd(xs, ws, weight_use)
            } else {
                shape.run(xs, ws)
            };
            Tensor::from_vec(values, (m, n), &Device::Cpu)?
        }
        (CpuStorage::F64(xs), CpuStorage::F64(ws)) => {
            Tensor::from_vec(shape.run(slice(xs, x_layout)?, slice(ws, w_layout)?), (m, n), &Device::Cpu)?
        }
        _ => return Ok(None),
    };
    Ok(Some(product))
}

/// The contiguous elements of a tensor's storage.
fn slice<'a, T>(values: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("cpu_matmul: operand is not contiguous"),
    }
}

/// Sizes and the right operand's strides of one product `(m, k) · (k, n)`.
struct Operands {
    m: usize,
    n: usize,
    k: usize,
    row_stride: usize,
    column_stride: usize,
}

/// Where one thread writes: a raw pointer to the shared output, to slices no other thread touches.
#[derive(Clone, Copy)]
struct Output<T>(*mut T);

// SAFETY: each thread writes only its own columns of the output (see `Operands::run`).
unsafe impl<T> Send for Output<T> {}
unsafe impl<T> Sync for Output<T> {}

impl<T> Output<T> {
    /// The output pointer advanced by `offset` elements.
    ///
    /// # Safety
    /// `offset` must lie inside the output.
    unsafe fn at(&self, offset: usize) -> *mut T {
        unsafe { self.0.add(offset) }
    }
}

impl Operands {
    /// The product on the AVX-512 kernels, threads taking ranges of output columns from a shared cursor.
    fn run_simd(&self, x: &[f32], w: &[f32], weight_use: WeightUse) -> Vec<f32> {
        let Operands { m, n, k, .. } = *self;
        // The outer-product kernel adds into its output, the dot-product kernel overwrites every element.
        let mut y = match weight_use {
            WeightUse::Transposed => Vec::with_capacity(m * n),
            WeightUse::AsIs => vec![0f32; m * n],
        };
        let output = Output(y.as_mut_ptr());
        let unit = match weight_use {
            WeightUse::Transposed => 16,
            WeightUse::AsIs => simd_matmul::OUTER_COLUMNS,
        };
        barrier_pool().execute_chunked(n.div_ceil(unit), |units| {
            let columns = units.start * unit..(units.end * unit).min(n);
            // SAFETY: `available()` was checked; `x` is m·k, `w` is n·k (either orientation), `y` has room for m·n
            // (zeroed where the kernel adds), and the cursor hands every column range to exactly one thread.
            unsafe {
                match weight_use {
                    WeightUse::Transposed => simd_matmul::dot_columns(x, m, k, w, output.at(0), n, columns),
                    WeightUse::AsIs => simd_matmul::outer_columns(x, m, k, w, output.at(0), n, columns),
                }
            }
        });
        // SAFETY: every one of the m·n elements was written above (zeroed, or overwritten by `dot_columns`).
        unsafe { y.set_len(m * n) };
        y
    }

    fn run<T: WithDType>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let Operands { m, n, k, row_stride, column_stride } = *self;
        let mut y = vec![T::from_f64(0.0); m * n];
        let output = Output(y.as_mut_ptr());
        let width = n.div_ceil(super::workers::threads().min(n));
        let slices: Vec<(usize, usize)> = (0..n).step_by(width).map(|start| (start, width.min(n - start))).collect();
        super::workers::for_each_item(slices, |(start, count)| {
            // SAFETY: the slices are in bounds (`x` is m·k, `w` covers k·n through the given strides, `y` is m·n)
            // and threads write disjoint columns `start..start + count` of `y`; `gemm` reads `W` through its
            // strides, so the weight is never copied.
            unsafe {
                gemm(
                    m,
                    count,
                    k,
                    output.at(start),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr().add(start * column_stride),
                    column_stride as isize,
                    row_stride as isize,
                    T::from_f64(0.0),
                    T::from_f64(1.0),
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn equals_candle_products_in_both_orientations() {
        let device = Device::Cpu;
        for (m, k, n) in [(1, 7, 5), (3, 16, 33), (45, 64, 96), (130, 32, 17)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &device).unwrap();
            let expected = x.matmul(&w.t().unwrap()).unwrap();
            let got = try_matmul_weight_transposed(&x, &w).unwrap().expect("f32 CPU operands qualify");
            assert!(close(&got, &expected) < 1e-4, "x·Wᵀ {m}×{k}×{n}");
            let g = Tensor::randn(0f32, 1.0, (m, n), &device).unwrap();
            let expected = g.matmul(&w).unwrap();
            let got = try_matmul_weight(&g, &w).unwrap().expect("f32 CPU operands qualify");
            assert!(close(&got, &expected) < 1e-4, "g·W {m}×{n}×{k}");
        }
    }

    #[test]
    fn strided_operands_and_f64_are_handled() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (9, 12), &device).unwrap();
        let w = Tensor::randn(0f64, 1.0, (12, 10), &device).unwrap().t().unwrap();
        let got = try_matmul_weight_transposed(&x, &w).unwrap().expect("f64 CPU operands qualify");
        let expected = x.matmul(&w.t().unwrap()).unwrap();
        let diff = (got - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12);
    }

    #[test]
    fn tracked_operands_and_half_precision_are_left_to_candle() {
        let device = Device::Cpu;
        let w = candle_core::Var::new(&[[1f32, 2.0], [3.0, 4.0]], &device).unwrap();
        let x = Tensor::new(&[[1f32, -1.0]], &device).unwrap();
        assert!(try_matmul_weight_transposed(&x, w.as_tensor()).unwrap().is_none(), "a tracked weight needs candle");
        let y = crate::model::layers::matmul_transposed(&x, w.as_tensor()).unwrap();
        let gradients = y.sum_all().unwrap().backward().unwrap();
        assert!(gradients.get(w.as_tensor()).is_some(), "the weight's gradient must survive the dispatch");
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        assert!(try_matmul_weight(&half(&x), &half(w.as_tensor())).unwrap().is_none(), "f16 is left to candle");
    }
}
