//! The gate activations of gated MLPs, `down(act(gate · x) ⊙ up · x)`: SiLU (Llama's SwiGLU) and the tanh
//! approximation of GELU (Gemma's GeGLU).
//!
//! Each is a scalar function with its derivative, used by the CPU kernels of both forward paths
//! ([`gated_product_fast`] and the differentiable [`super::kernels::fused::gated_product`]), and a composed
//! candle operation for other devices and dtypes. The tanh form is computed as `x · σ(2u)` with
//! `u = √(2/π) (x + 0.044715 x³)`, which equals `½ x (1 + tanh u)` exactly and needs only one exponential.

use candle_core::{Result, Tensor};

use super::kernels::fast_exp::{exp_f32, with_cpu_f32, with_simd};

/// `√(2/π)`.
const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation of GELU.
const GELU_CUBIC: f32 = 0.044_715;

/// The activation applied to the gate of a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateActivation {
    /// `x · σ(x)`.
    Silu,
    /// `½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (Hugging Face `gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
}

impl GateActivation {
    /// The activation a Hugging Face `hidden_act` / `hidden_activation` name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(GateActivation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_tanh" => Some(GateActivation::GeluTanh),
            _ => None,
        }
    }

    /// Its value at `x`.
    #[inline(always)]
    pub fn value(self, x: f32) -> f32 {
        match self {
            GateActivation::Silu => x / (1.0 + exp_f32(-x)),
            GateActivation::GeluTanh => x / (1.0 + exp_f32(-2.0 * gelu_argument(x))),
        }
    }

    /// Its derivative at `x`.
    #[inline(always)]
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            GateActivation::Silu => {
                let sigmoid = 1.0 / (1.0 + exp_f32(-x));
                sigmoid * (1.0 + x * (1.0 - sigmoid))
            }
            GateActivation::GeluTanh => {
                let sigmoid = 1.0 / (1.0 + exp_f32(-2.0 * gelu_argument(x)));
                let slope = 2.0 * SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
                sigmoid + x * sigmoid * (1.0 - sigmoid) * slope
            }
        }
    }

    /// The activation as composed candle operations (differentiable, any device and dtype).
    pub fn composed(self, x: &Tensor) -> Result<Tensor> {
        match self {
            GateActivation::Silu => candle_nn::ops::silu(x),
            GateActivation::GeluTanh => x.gelu(),
        }
    }
}

/// The gated product `act(gate) · up` of a stacked `(rows, 2·width)` projection `[gate | up]`, for the fast
/// (no-gradient) path on the CPU; other devices and dtypes use candle's composed operations.
pub fn gated_product_fast(gate_up: &Tensor, width: usize, activation: GateActivation) -> Result<Tensor> {
    let gate_up = gate_up.contiguous()?;
    let rows = gate_up.dim(0)?;
    // `None` (generic forms forced, another device or dtype) falls to the composed product below.
    let computed = super::kernels::generic::use_cpu_kernels(gate_up.device())
        .then(|| {
            with_cpu_f32(&gate_up, |values| {
                let mut out = vec![0f32; rows * width];
                let rows_per_thread = rows.div_ceil(crate::model::kernels::workers::threads()).max(1);
                let pieces: Vec<(usize, &mut [f32])> = out.chunks_mut(rows_per_thread * width).enumerate().collect();
                crate::model::kernels::workers::for_each_item(pieces, |(index, target)| {
                    let source = &values[index * rows_per_thread * 2 * width..];
                    with_simd(
                        #[inline(always)]
                        || {
                            for (row_out, row_in) in target.chunks_exact_mut(width).zip(source.chunks_exact(2 * width))
                            {
                                let (gate, up) = row_in.split_at(width);
                                for ((y, &g), &u) in row_out.iter_mut().zip(gate).zip(up) {
                                    *y = activation.value(g) * u;
                                }
                            }
                        },
                    )
                });
                out
            })
        })
        .flatten();
    match computed {
        Some(out) => Tensor::from_vec(out, (rows, width), gate_up.device()),
        None => activation.composed(&gate_up.narrow(1, 0, width)?)? * gate_up.narrow(1, width, width)?,
    }
}

/// `u = √(2/π) (x + 0.044715 x³)`.
#[inline(always)]
fn gelu_argument(x: f32) -> f32 {
    SQRT_TWO_OVER_PI * (x + GELU_CUBIC * x * x * x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn reference_gelu_tanh(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    }

    #[test]
    fn gelu_tanh_matches_its_tanh_form_and_candle() {
        let xs: Vec<f32> = (-800..=800).map(|i| i as f32 / 40.0).collect();
        let candle = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap().gelu().unwrap().to_vec1::<f32>().unwrap();
        for (&x, &theirs) in xs.iter().zip(&candle) {
            let ours = GateActivation::GeluTanh.value(x);
            let exact = reference_gelu_tanh(f64::from(x)) as f32;
            assert!((ours - exact).abs() <= 2e-6 * (1.0 + exact.abs()), "x={x}: {ours} vs {exact}");
            assert!((ours - theirs).abs() <= 2e-5 * (1.0 + theirs.abs()), "x={x}: {ours} vs candle {theirs}");
        }
    }

    #[test]
    fn derivatives_match_autograd_of_the_composed_forms() {
        let xs: Vec<f32> = (-300..=300).map(|i| i as f32 / 37.0).collect();
        for activation in [GateActivation::Silu, GateActivation::GeluTanh] {
            let x = Var::new(xs.as_slice(), &Device::Cpu).unwrap();
            let y = activation.composed(x.as_tensor()).unwrap().sum_all().unwrap();
            let grads = y.backward().unwrap();
            let expected = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            for (&x, &theirs) in xs.iter().zip(&expected) {
                let ours = activation.derivative(x);
                assert!(
                    (ours - theirs).abs() <= 1e-4 * (1.0 + theirs.abs()),
                    "{activation:?} x={x}: {ours} vs {theirs}"
                );
                let value = activation.value(x);
                let composed = activation.composed(&Tensor::new(&[x], &Device::Cpu).unwrap()).unwrap();
                let composed = composed.to_vec1::<f32>().unwrap()[0];
                assert!((value - composed).abs() <= 2e-5 * (1.0 + composed.abs()), "{activation:?} x={x}");
            }
        }
    }

    #[test]
    fn the_fast_silu_product_matches_candle() {
        let device = candle_core::Device::Cpu;
        let gate_up =
            Tensor::arange(-24f32, 24.0, &device).unwrap().affine(0.37, 0.01).unwrap().reshape((3, 16)).unwrap();
        let ours = gated_product_fast(&gate_up, 8, GateActivation::Silu).unwrap().to_vec2::<f32>().unwrap();
        let silu = candle_nn::ops::silu(&gate_up.narrow(1, 0, 8).unwrap()).unwrap();
        let theirs = (silu * gate_up.narrow(1, 8, 8).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
