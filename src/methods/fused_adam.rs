//! Adam (Kingma & Ba; PyTorch's `torch.optim.Adam` without weight decay) updating each parameter in one pass over
//! plain `f32` buffers.
//!
//! candle_nn's `AdamW` composes a dozen tensor operations per parameter, each allocating a tensor of the parameter's
//! size: for MEND's ~32.5 M-parameter editor that is ~1.5 GB of fresh memory per optimiser step. Here the moments are
//! kept as vectors and each parameter is read, updated and written back once. The arithmetic is PyTorch's:
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `θ ← θ − lr · m̂ / (√v̂ + ε)` with `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`.
//! Parameters without a gradient in a step keep their value and moments.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::model::kernels::fast_exp::{with_cpu_f32, with_f32_values};

/// Adam's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
}

impl AdamParams {
    /// PyTorch's defaults (β₁ 0.9, β₂ 0.999, ε 1e-8) with learning rate `lr`.
    pub fn with_lr(lr: f64) -> Self {
        Self { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// Adam over a list of `f32` parameters.
pub struct FusedAdam {
    vars: Vec<Var>,
    moments: Vec<(Vec<f32>, Vec<f32>)>,
    params: AdamParams,
    steps: i32,
}

impl FusedAdam {
    /// An optimiser for `vars` (all `f32`), moments at zero.
    pub fn new(vars: Vec<Var>, params: AdamParams) -> Result<Self> {
        if let Some(var) = vars.iter().find(|v| v.dtype() != DType::F32) {
            return Err(Error::invalid("(adam)", "parameter", format!("f32 expected, found {:?}", var.dtype())));
        }
        let moments = vars.iter().map(|v| (vec![0.0; v.elem_count()], vec![0.0; v.elem_count()])).collect();
        Ok(Self { vars, moments, params, steps: 0 })
    }

    /// One step with the gradients in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let AdamParams { lr, beta1, beta2, eps } = self.params;
        // The complements in f64 first: 1 − 0.999f32 is off by 5e-5 relative.
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        let (c1, c2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
        let m_scale = (1.0 / (1.0 - beta1.powi(self.steps))) as f32;
        let v_scale = (1.0 / (1.0 - beta2.powi(self.steps))) as f32;
        let (lr, eps) = (lr as f32, eps as f32);
        for (var, (m, v)) in self.vars.iter().zip(&mut self.moments) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            if g.elem_count() != m.len() {
                return Err(Error::invalid(
                    "(adam)",
                    "gradient",
                    format!("{} elements for {}", g.elem_count(), m.len()),
                ));
            }
            let mut update = |g: &[f32], theta: &[f32]| -> Vec<f32> {
                let mut next = Vec::with_capacity(theta.len());
                for (((&t, &g), m), v) in theta.iter().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + c1 * g;
                    *v = b2 * *v + c2 * g * g;
                    next.push(t - lr * (*m * m_scale) / ((*v * v_scale).sqrt() + eps));
                }
                next
            };
            let next = match with_f32_values(g, |g| with_cpu_f32(var.as_tensor(), |theta| update(g, theta)))? {
                Some(next) => next,
                // A parameter on another device (or not contiguous): the same update on a host copy.
                None => {
                    let theta = var.as_tensor().to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    with_f32_values(g, |g| update(g, &theta))?
                }
            };
            var.set(&Tensor::from_vec(next, var.shape(), var.device())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    #[test]
    fn matches_candle_adamw_without_weight_decay() {
        let init = [0.5f32, -1.0, 2.0, 0.0];
        let ours = Var::new(&init, &Device::Cpu).unwrap();
        let theirs = Var::new(&init, &Device::Cpu).unwrap();
        let untouched = Var::new(&[7.0f32], &Device::Cpu).unwrap();
        let mut fused = FusedAdam::new(vec![ours.clone(), untouched.clone()], AdamParams::with_lr(0.1)).unwrap();
        let params = ParamsAdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut reference = AdamW::new(vec![theirs.clone()], params).unwrap();
        for step in 0..5 {
            let g = |v: &Var| (v.as_tensor().sqr().unwrap() * (step as f64 + 1.0)).unwrap();
            let mut grads = GradStore::default();
            grads.insert(ours.as_tensor(), g(&ours));
            fused.step(&grads).unwrap();
            let mut grads = GradStore::default();
            grads.insert(theirs.as_tensor(), g(&theirs));
            reference.step(&grads).unwrap();
        }
        let (a, b) = (ours.as_tensor().to_vec1::<f32>().unwrap(), theirs.as_tensor().to_vec1::<f32>().unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
        assert_ne!(a, init.to_vec(), "the parameters moved");
        assert_eq!(untouched.as_tensor().to_vec1::<f32>().unwrap(), [7.0], "no gradient, no step");
    }
}
