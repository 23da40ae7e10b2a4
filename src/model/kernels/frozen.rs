//! Matrix products with a frozen weight, whose backward pass computes only the input gradient.
//!
//! candle's matmul backward always computes the gradient of both operands, so back-propagating through a network
//! whose weights are constants spends half its time on weight gradients nobody reads. Editing methods optimise a
//! vector or one weight, so the differentiable path routes every other linear layer through this op: the forward value
//! is an ordinary (untracked) product, and the op's backward returns `grad · W` for the input alone.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `x · Wᵀ` for `x: (n, in)` and a constant `w: (out, in)`, differentiable in `x` only.
pub fn matmul_frozen(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !super::generic::use_cpu_kernels(x.device()) {
        // Device-generic form: candle's product with the weight detached (same values and input gradient; the
        // backward also multiplies out the weight's gradient, which nothing reads).
        return crate::model::layers::matmul_transposed(x, &w.detach());
    }
    let value = crate::model::layers::matmul_transposed(&x.detach(), w)?;
    x.apply_op1(InputGradientOnly { value, weight: w.detach() })
}

/// The input gradient `g · W` of `x · Wᵀ`, on the worker pool when the operands qualify.
pub(crate) fn input_gradient(grad: &Tensor, w: &Tensor) -> Result<Tensor> {
    match super::cpu_matmul::try_matmul_weight(grad, w)? {
        Some(gradient) => Ok(gradient),
        None => grad.matmul(w),
    }
}

/// A custom op's forward value computed beforehand, handed to candle as the op's CPU storage.
pub(crate) fn precomputed_storage(value: &Tensor, op: &str) -> Result<(CpuStorage, Shape)> {
    let flat = value.flatten_all()?;
    let storage = match value.dtype() {
        candle_core::DType::F32 => CpuStorage::F32(flat.to_vec1::<f32>()?),
        candle_core::DType::F64 => CpuStorage::F64(flat.to_vec1::<f64>()?),
        candle_core::DType::F16 => CpuStorage::F16(flat.to_vec1::<half::f16>()?),
        candle_core::DType::BF16 => CpuStorage::BF16(flat.to_vec1::<half::bf16>()?),
        other => candle_core::bail!("{op}: unsupported dtype {other:?}"),
    };
    Ok((storage, value.shape().clone()))
}

struct InputGradientOnly {
    value: Tensor,
    weight: Tensor,
}

impl CustomOp1 for InputGradientOnly {
    fn name(&self) -> &'static str {
        "matmul-frozen-weight"
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        precomputed_storage(&self.value, self.name())
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(input_gradient(grad_res, &self.weight)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn same_value_and_input_gradient_as_plain_matmul() {
        let device = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.5, 2.0]], &device).unwrap();
        let x = Var::new(&[[0.3f32, -0.2, 0.7], [1.0, 2.0, -1.0]], &device).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let frozen = matmul_frozen(x.as_tensor(), &w).unwrap();
        assert_eq!(plain.to_vec2::<f32>().unwrap(), frozen.to_vec2::<f32>().unwrap());
        let loss = |y: &Tensor| y.sqr().unwrap().sum_all().unwrap();
        let g_plain = loss(&plain).backward().unwrap();
        let g_frozen = loss(&frozen).backward().unwrap();
        let a = g_plain.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let b = g_frozen.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
        assert!(g_frozen.get(&w).is_none(), "the frozen weight must get no gradient");
    }
}
