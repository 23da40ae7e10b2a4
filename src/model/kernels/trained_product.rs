//! Matrix products with a trained weight, for small networks trained on the CPU (MEND's editor).
//!
//! candle's matmul runs on `gemm` with rayon, whose hand-offs make products of a few tens of rows slow on two cores,
//! and its backward goes through transposes and zero-filled gradient buffers. This op computes `x · Wᵀ` and the input
//! gradient `g · W` on the worker-pool kernels of [`super::cpu_matmul`] (the ones the frozen-weight products use) and
//! the weight gradient `gᵀ · x` with one product, returning both from a single backward step.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x · Wᵀ` for `x: (n, in)` and a trained `w: (out, in)`, differentiable in both.
pub fn matmul_trained(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !super::generic::use_cpu_kernels(x.device()) {
        // Device-generic form: candle's product, whose backward gives both gradients.
        return x.matmul(&w.t()?);
    }
    let value = crate::model::layers::matmul_transposed(&x.detach(), &w.detach())?;
    x.apply_op2(w, TrainedWeightProduct { value })
}

struct TrainedWeightProduct {
    value: Tensor,
}

impl CustomOp2 for TrainedWeightProduct {
    fn name(&self) -> &'static str {
        "matmul-trained-weight"
    }

    fn cpu_fwd(&self, _s1: &CpuStorage, _l1: &Layout, _s2: &CpuStorage, _l2: &Layout) -> Result<(CpuStorage, Shape)> {
        super::frozen::precomputed_storage(&self.value, self.name())
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, grad) = (x.detach(), w.detach(), grad.detach());
        let input_gradient = super::frozen::input_gradient(&grad, &w)?;
        let weight_gradient = grad.t()?.contiguous()?.matmul(&x.contiguous()?)?;
        Ok((Some(input_gradient), Some(weight_gradient)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn same_value_and_gradients_as_plain_matmul() {
        let device = Device::Cpu;
        let w = Var::new(&[[1f32, 2.0, 3.0], [-1.0, 0.5, 2.0]], &device).unwrap();
        let x = Var::new(&[[0.3f32, -0.2, 0.7], [1.0, 2.0, -1.0], [0.1, 0.0, 4.0], [2.0, -3.0, 0.5]], &device).unwrap();
        let plain = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let trained = matmul_trained(x.as_tensor(), w.as_tensor()).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "differ by {d}");
        };
        close(&plain, &trained);
        // A loss that weights the outputs unevenly, so both gradients are non-trivial.
        let weights = Tensor::new(&[[1f32, -2.0], [0.5, 3.0], [2.0, 1.0], [-1.0, 0.25]], &device).unwrap();
        let loss = |y: &Tensor| (y.sqr().unwrap() * &weights).unwrap().sum_all().unwrap();
        let g_plain = loss(&plain).backward().unwrap();
        let g_trained = loss(&trained).backward().unwrap();
        for var in [&x, &w] {
            close(g_plain.get(var.as_tensor()).unwrap(), g_trained.get(var.as_tensor()).unwrap());
        }
    }
}
