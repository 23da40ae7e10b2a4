//! Differentiable RMS norm and gated MLP products (SwiGLU, GeGLU) as single operations with hand-written backward passes (CPU, `f32`).
//!
//! The differentiable path composes these from candle's elementary operations so that gradients flow: six nodes for an
//! RMS norm (square, mean, add ε, square root, divide, scale), four for SwiGLU (two narrows, SiLU, product). Every node
//! costs a graph entry, a temporary, and in the backward pass a zero-filled gradient buffer plus an addition; a narrow's
//! backward even pads its gradient back to full width. Profiling ROME's optimisation on the default model put a
//! quarter of the main thread's time in that bookkeeping. Here each is one node: the forward value comes from the
//! fast path's kernels (so both paths agree), and the backward computes the input gradient directly:
//!
//! - RMS norm `y = x / r ⊙ w` with `r = √(mean(x²) + ε)`: `∂x = (u − x · (u·x) / (n·r²)) / r` for `u = ∂y ⊙ w`.
//! - Gated product `y = act(a) ⊙ b` for the stacked `[a | b]`: `∂a = ∂y ⊙ b ⊙ act′(a)`, `∂b = ∂y ⊙ act(a)`, with
//!   `act` SiLU or tanh-GELU ([`GateActivation`]).
//!
//! The scale `w` of the norm is treated as a constant (no editing method optimises it); callers use the composed
//! operations when it is tracked, and for other devices and dtypes.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::fast_exp::{cpu_f32_values as values_of, with_simd};
use crate::model::activation::{GateActivation, gated_product_fast};

/// Whether `x` can take the fused operations (these, and the prefix attention of [`super::prefix_attention_cpu`]): an
/// `f32` tensor on the CPU, the generic forms not forced ([`super::generic`]).
pub fn supports(x: &Tensor) -> bool {
    super::generic::use_cpu_kernels(x.device()) && x.dtype() == DType::F32
}

/// RMS normalisation of the last dimension with a constant scale `weight`, differentiable in `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let value = candle_nn::ops::rms_norm(&x.detach(), &weight.detach(), eps as f32)?;
    x.apply_op1(RmsNorm { value, weight: weight.detach(), eps })
}

/// `act(gate) ⊙ up` for a stacked `(rows, 2·width)` projection `[gate | up]`, differentiable in it.
pub fn gated_product(gate_up: &Tensor, width: usize, activation: GateActivation) -> Result<Tensor> {
    let gate_up = gate_up.contiguous()?;
    let value = gated_product_fast(&gate_up.detach(), width, activation)?;
    gate_up.apply_op1(GatedProduct { value, width, activation })
}

struct RmsNorm {
    value: Tensor,
    weight: Tensor,
    eps: f64,
}

struct GatedProduct {
    value: Tensor,
    width: usize,
    activation: GateActivation,
}

/// The precomputed forward value as the op's output storage.
fn value_storage(value: &Tensor) -> Result<(CpuStorage, Shape)> {
    let values = value.flatten_all()?.to_vec1::<f32>()?;
    Ok((CpuStorage::F32(values), value.shape().clone()))
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-constant-scale"
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        value_storage(&self.value)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (x, grad, weight) = (values_of(arg)?, values_of(grad_res)?, values_of(&self.weight)?);
        let width = weight.len();
        let mut out = vec![0f32; x.len()];
        with_simd(
            #[inline(always)]
            || {
                for ((out, x), grad) in
                    out.chunks_exact_mut(width).zip(x.chunks_exact(width)).zip(grad.chunks_exact(width))
                {
                    let mean_square = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / width as f64;
                    let inverse_rms = 1.0 / (mean_square + self.eps).sqrt();
                    let projection: f64 =
                        x.iter().zip(grad).zip(&weight).map(|((&x, &g), &w)| f64::from(g * w) * f64::from(x)).sum();
                    let along_x = (projection * inverse_rms * inverse_rms / width as f64) as f32;
                    let inverse_rms = inverse_rms as f32;
                    for (((out, &x), &g), &w) in out.iter_mut().zip(x).zip(grad).zip(&weight) {
                        *out = (g * w - x * along_x) * inverse_rms;
                    }
                }
            },
        );
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

impl CustomOp1 for GatedProduct {
    fn name(&self) -> &'static str {
        "gated-product"
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        value_storage(&self.value)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (gate_up, grad) = (values_of(arg)?, values_of(grad_res)?);
        let width = self.width;
        let mut out = vec![0f32; gate_up.len()];
        with_simd(
            #[inline(always)]
            || {
                for ((out, input), grad) in
                    out.chunks_exact_mut(2 * width).zip(gate_up.chunks_exact(2 * width)).zip(grad.chunks_exact(width))
                {
                    let (gate, up) = input.split_at(width);
                    let (gate_grad, up_grad) = out.split_at_mut(width);
                    for i in 0..width {
                        let (a, b, g) = (gate[i], up[i], grad[i]);
                        gate_grad[i] = g * b * self.activation.derivative(a);
                        up_grad[i] = g * self.activation.value(a);
                    }
                }
            },
        );
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Value and input gradient of `f` under a fixed weighting of its output, against the composed reference `g`.
    fn compare(x: &Tensor, f: impl Fn(&Tensor) -> Tensor, g: impl Fn(&Tensor) -> Tensor) {
        let x = Var::from_tensor(x).unwrap();
        let (ours, reference) = (f(x.as_tensor()), g(x.as_tensor()));
        assert!(largest_difference(&ours, &reference) < 1e-5, "values differ");
        let weighting = Tensor::randn(0f32, 1.0, ours.shape(), x.device()).unwrap();
        let loss = |y: &Tensor| (y * &weighting).unwrap().sum_all().unwrap();
        let ours = loss(&ours).backward().unwrap().remove(x.as_tensor()).unwrap();
        let reference = loss(&reference).backward().unwrap().remove(x.as_tensor()).unwrap();
        assert!(largest_difference(&ours, &reference) < 1e-4, "gradients differ");
    }

    #[test]
    fn rms_norm_matches_the_composed_operations() {
        let device = Device::Cpu;
        let x = Tensor::randn(0.3f32, 2.0, (5, 24), &device).unwrap();
        let weight = Tensor::randn(1f32, 0.5, 24, &device).unwrap();
        compare(
            &x,
            |x| rms_norm(x, &weight, 1e-5).unwrap(),
            |x| candle_nn::ops::rms_norm_slow(x, &weight, 1e-5).unwrap(),
        );
    }

    #[test]
    fn gated_products_match_the_composed_operations() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (4, 2 * 20), &device).unwrap();
        for activation in [GateActivation::Silu, GateActivation::GeluTanh] {
            compare(
                &x,
                |x| gated_product(x, 20, activation).unwrap(),
                |x| {
                    let gate = activation.composed(&x.narrow(D::Minus1, 0, 20).unwrap()).unwrap();
                    (gate * x.narrow(D::Minus1, 20, 20).unwrap()).unwrap()
                },
            );
        }
    }
}
