//! A vectorisable `exp` for f32 slices, and the fast-path kernels built on it (SwiGLU, log-sum-exp).
//!
//! `f32::exp` calls libm once per element; evaluation spends a noticeable share of its time there (SiLU on every
//! MLP activation, the log-sum-exp of every scored token's logits). [`exp_f32`] uses the classic Cody–Waite range
//! reduction `x = n·ln2 + r` with a degree-6 polynomial for `e^r` and scales by `2^n` through the exponent bits; the
//! loop has no branches, so the compiler vectorises it for the widest vector unit the CPU has (checked at run time). The relative error stays below 2e-7 (about 2 ulp) on the
//! range that matters here; inputs below −87 give 0 and above 88 saturate, as `expf` would overflow there anyway.

use candle_core::{Result, Tensor};

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding and subtracting 1.5·2²³ rounds an f32 of magnitude below 2²² to the nearest integer without a call.
const ROUNDER: f32 = 12_582_912.0;

/// `e^x`, accurate to about 2 ulp for `x` in [−87, 88]; branch-free so that loops over it vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // max/min rather than clamp: no NaN assertion, so the loop stays branch-free and vectorises.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(88.0);
    let shifted = x * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    // The integer n sits in the low mantissa bits of `shifted`: no (scalarising) float-to-int conversion needed.
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    p * scale
}

/// Runs `body` compiled for the widest vector extension this CPU has (AVX-512, AVX2 + FMA, or the baseline), so that
/// the loops inside it vectorise accordingly.
///
/// The closure is called from three functions, so the compiler keeps it as a function of its own — compiled for the
/// baseline (SSE2) unless it is inlined into each: callers mark it `#[inline(always)] || { … }`. Without the mark the
/// tiled attention ran at SSE width with scalar exponentials (a 4,096-token document at 0.26× the short-sentence
/// rate). Wider vectors do not change results: nothing is fused or reordered (no fast-math), only more lanes at once.
#[inline]
pub fn with_simd<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn medium<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { wide(body) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { medium(body) };
        }
    }
    body()
}

/// `Σ exp(x − shift)` over a slice: 16 f32 lanes, then an f64 total.
pub fn sum_exp_shifted(values: &[f32], shift: f32) -> f64 {
    with_simd(
        #[inline(always)]
        || {
            let mut lanes = [0f32; 16];
            let mut chunks = values.chunks_exact(16);
            for chunk in &mut chunks {
                for (lane, &x) in lanes.iter_mut().zip(chunk) {
                    *lane += exp_f32(x - shift);
                }
            }
            let tail: f64 = chunks.remainder().iter().map(|&x| f64::from(exp_f32(x - shift))).sum();
            lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + tail
        },
    )
}

/// The largest element (−∞ for an empty slice), with 16 independent lanes so that it vectorises.
pub fn max_of(values: &[f32]) -> f32 {
    with_simd(
        #[inline(always)]
        || {
            let mut lanes = [f32::NEG_INFINITY; 16];
            let mut chunks = values.chunks_exact(16);
            for chunk in &mut chunks {
                for (lane, &x) in lanes.iter_mut().zip(chunk) {
                    *lane = if x > *lane { x } else { *lane };
                }
            }
            chunks.remainder().iter().chain(lanes.iter()).copied().fold(f32::NEG_INFINITY, f32::max)
        },
    )
}

/// Calls `f` with the elements of a contiguous f32 CPU tensor, without copying; `None` for any other tensor.
pub fn with_cpu_f32<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = tensor.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok().map(|values| f(&values[start..end])),
        _ => None,
    }
}

/// Calls `f` with the elements of `tensor` as contiguous `f32`s: in place for a contiguous f32 CPU tensor, from a
/// converted copy for any other dtype, layout or device.
pub fn with_f32_values<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let mut f = Some(f);
    if let Some(r) = with_cpu_f32(tensor, |values| (f.take().expect("called once"))(values)) {
        return Ok(r);
    }
    let values = tensor.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((f.take().expect("not called yet"))(&values))
}

/// The elements of an `f32` CPU tensor (any layout) as one vector; an error for any other tensor.
pub fn cpu_f32_values(tensor: &Tensor) -> Result<Vec<f32>> {
    let tensor = tensor.contiguous()?;
    match with_cpu_f32(&tensor, |values| values.to_vec()) {
        Some(values) => Ok(values),
        None => {
            candle_core::bail!("expected an f32 tensor on the CPU, found {:?} on {:?}", tensor.dtype(), tensor.device())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let ours = exp_f32(x) as f64;
            let exact = (x as f64).exp();
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(-1000.0), exp_f32(-87.0));
    }
}
