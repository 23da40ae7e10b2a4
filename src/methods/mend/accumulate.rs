//! Gradient accumulation for MEND's training loop: the gradients of `accumulate_bs` edits are summed, their mean is
//! clipped to a global norm and handed to the optimisers, as the reference's `safe_backward` + `clip_grad_norm_` do.
//!
//! The sums live in plain `f32` buffers, one per parameter, added to in place: the editor has ~32.5 M parameters on
//! the default model, and summing them as tensors allocated (and page-faulted) a fresh 130 MB every edit. A gradient
//! with a non-finite element is refused whole before anything is added, so a skipped edit leaves the sums untouched.

use candle_core::backprop::GradStore;
use candle_core::{Shape, Tensor, Var};

use crate::error::Result;
use crate::model::kernels::fast_exp::with_f32_values as with_values;

/// Running sums of the gradients of a list of parameters.
pub struct Accumulator {
    sums: Vec<Option<(Vec<f32>, Shape)>>,
}

impl Accumulator {
    /// An empty accumulator for `count` parameters.
    pub fn new(count: usize) -> Self {
        Self { sums: vec![None; count] }
    }

    /// Adds the gradients of `vars` in `grads` (a parameter without a gradient adds nothing). Returns false, and adds
    /// nothing, when any element of any gradient is not finite.
    pub fn add(&mut self, vars: &[Var], grads: &GradStore) -> Result<bool> {
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor())
                && !with_values(g, |values| values.iter().all(|x| x.is_finite()))?
            {
                return Ok(false);
            }
        }
        for (sum, var) in self.sums.iter_mut().zip(vars) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            with_values(g, |values| match sum {
                Some((total, _)) => total.iter_mut().zip(values).for_each(|(t, &v)| *t += v),
                None => *sum = Some((values.to_vec(), g.shape().clone())),
            })?;
        }
        Ok(true)
    }

    /// The mean of the accumulated gradients over `steps`, clipped to `clip` (global norm of the mean), as a store for
    /// the optimisers; empties itself.
    pub fn take_clipped(&mut self, vars: &[Var], steps: usize, clip: f64) -> Result<GradStore> {
        let steps = steps.max(1) as f64;
        let squares: f64 = self.sums.iter().flatten().flat_map(|(v, _)| v.iter()).map(|&x| f64::from(x).powi(2)).sum();
        let norm = squares.sqrt() / steps;
        let scale = (if norm > clip { clip / norm } else { 1.0 } / steps) as f32;
        let mut store = GradStore::default();
        for (sum, var) in self.sums.iter_mut().zip(vars) {
            if let Some((mut values, shape)) = sum.take() {
                values.iter_mut().for_each(|x| *x *= scale);
                let mean = Tensor::from_vec(values, shape, var.device())?.to_dtype(var.dtype())?;
                store.insert(var.as_tensor(), mean);
            }
        }
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn grads_of(vars: &[Var], values: &[&[f32]]) -> GradStore {
        let mut store = GradStore::default();
        for (var, v) in vars.iter().zip(values) {
            store.insert(var.as_tensor(), Tensor::new(*v, &Device::Cpu).unwrap());
        }
        store
    }

    #[test]
    fn sums_average_clip_and_refuse_non_finite_gradients() {
        let vars = [Var::zeros(2, DType::F32, &Device::Cpu).unwrap(), Var::zeros(1, DType::F32, &Device::Cpu).unwrap()];
        let mut acc = Accumulator::new(2);
        assert!(acc.add(&vars, &grads_of(&vars, &[&[1.0, 2.0], &[3.0]])).unwrap());
        assert!(!acc.add(&vars, &grads_of(&vars, &[&[1.0, f32::NAN], &[100.0]])).unwrap());
        assert!(acc.add(&vars, &grads_of(&vars, &[&[3.0, 2.0], &[5.0]])).unwrap());
        // Mean over two steps: [2, 2] and [4]; norm √24 ≈ 4.9, under the clip.
        let store = acc.take_clipped(&vars, 2, 100.0).unwrap();
        assert_eq!(store.get(vars[0].as_tensor()).unwrap().to_vec1::<f32>().unwrap(), [2.0, 2.0]);
        assert_eq!(store.get(vars[1].as_tensor()).unwrap().to_vec1::<f32>().unwrap(), [4.0]);
        // Clipped to norm 1: every element scaled by 1/√24.
        acc.add(&vars, &grads_of(&vars, &[&[2.0, 2.0], &[4.0]])).unwrap();
        let store = acc.take_clipped(&vars, 1, 1.0).unwrap();
        let got = store.get(vars[1].as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((got - 4.0 / 24f32.sqrt()).abs() < 1e-6, "{got}");
        // Emptied: nothing left to apply.
        assert!(acc.take_clipped(&vars, 1, 1.0).unwrap().get(vars[0].as_tensor()).is_none());
    }
}
