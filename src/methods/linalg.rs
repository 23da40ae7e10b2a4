//! Dense f64 linear algebra the methods need and candle lacks: solving symmetric positive-definite systems.

use candle_core::{DType, Tensor};
use nalgebra::DMatrix;

use crate::error::{Error, Result};

fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, cols) = t.dims2()?;
    let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(rows, cols, &values))
}

fn to_tensor(m: &DMatrix<f64>, device: &candle_core::Device) -> Result<Tensor> {
    let (rows, cols) = m.shape();
    let values: Vec<f64> = m.transpose().as_slice().to_vec();
    Ok(Tensor::from_vec(values, (rows, cols), device)?)
}

/// Solves `A X = B` for a symmetric positive-definite `A: (n, n)` and `B: (n, m)`, in f64 (Cholesky).
pub fn solve_spd(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let cholesky = to_matrix(a)?.cholesky().ok_or_else(|| {
        Error::invalid("(linear algebra)", "matrix", "not positive definite (too few statistics tokens?)")
    })?;
    to_tensor(&cholesky.solve(&to_matrix(b)?), a.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_small_system() {
        let device = candle_core::Device::Cpu;
        let a = Tensor::new(&[[4f64, 1.0], [1.0, 3.0]], &device).unwrap();
        let b = Tensor::new(&[[1f64, 0.0], [2.0, 1.0]], &device).unwrap();
        let x = solve_spd(&a, &b).unwrap();
        let back = a.matmul(&x).unwrap().to_vec2::<f64>().unwrap();
        for (row, expected) in back.iter().zip([[1.0, 0.0], [2.0, 1.0]]) {
            for (v, e) in row.iter().zip(expected) {
                assert!((v - e).abs() < 1e-12);
            }
        }
        let not_spd = Tensor::new(&[[1f64, 2.0], [2.0, 1.0]], &device).unwrap();
        assert!(solve_spd(&not_spd, &b).is_err());
    }
}
